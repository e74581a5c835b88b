//! Shared by the namespace tests: the namespace helper from `integration`, and this
//! package's binaries.

#![allow(dead_code)]

pub use integration::netns::Netns;

/// A binary of this package, built by cargo for the tests.
pub fn bin(name: &str) -> String {
    match name {
        "qemu-bridge-plugin" => env!("CARGO_BIN_EXE_qemu-bridge-plugin").to_string(),
        _ => env!("CARGO_BIN_EXE_bridge-plugin").to_string(),
    }
}
