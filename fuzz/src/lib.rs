//! The checks the fuzz targets run (see `checks`).
pub mod checks;
