//! The CPUs the datapath's threads may run on (`--worker-cpus`): a list as taskset and
//! OVS's `pmd-cpu-mask` users write it ("0-3,6"), checked against the CPUs this process
//! may use, and a thread pinned to them.

/// Parses "2", "0-3" or "0-3,6,8-9"; CPUs in order, each once.
pub fn parse(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim) {
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{s}' in '{text}' is not a CPU number (e.g. 0-3,6)"))
        };
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        if first > last || last >= libc::CPU_SETSIZE as usize {
            return Err(format!("'{part}' in '{text}' is not a CPU range"));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The CPUs this process may run on now.
fn allowed() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is the empty set; sched_getaffinity writes at most its
    // size; CPU_ISSET reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The first of `cpus` this process may not run on, with the ones it may.
pub fn check(cpus: &[usize]) -> Result<(), (usize, Vec<usize>)> {
    if cpus.is_empty() {
        return Ok(());
    }
    let allowed = allowed();
    match cpus.iter().find(|c| !allowed.contains(c)) {
        Some(&cpu) => Err((cpu, allowed)),
        None => Ok(()),
    }
}

/// Pins the calling thread to `cpus` (nothing for an empty list). The CPUs were checked at
/// start; a failure now (the cgroup changed meanwhile) leaves the thread where it was.
pub fn pin(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: as in `allowed`; sched_setaffinity only reads the set.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        log::warn!(
            "cannot pin a worker to CPUs {cpus:?}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The CPUs the calling thread may run on.
pub fn of_this_thread() -> Vec<usize> {
    allowed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges_are_read_as_taskset_writes_them() {
        assert_eq!(parse("2").unwrap(), vec![2]);
        assert_eq!(parse("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse("6, 0-1,1").unwrap(), vec![0, 1, 6]);
        assert!(parse("3-1").is_err());
        assert!(parse("a").unwrap_err().contains("not a CPU number"));
        assert!(parse("0-99999").is_err());
    }

    #[test]
    fn a_cpu_outside_the_process_set_is_found() {
        let mine = allowed();
        assert!(check(&mine).is_ok());
        assert_eq!(check(&[mine[0], 1023]), Err((1023, mine)));
    }

    #[test]
    fn a_thread_is_pinned_to_the_cpus_given() {
        let mine = allowed();
        let first = mine[0];
        let seen = std::thread::spawn(move || {
            pin(&[first]);
            of_this_thread()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![first]);
    }
}
