//! Whether another process still runs: how the disk tier and the shm PD buffer tell files
//! a dead process left behind from files a live one still uses.

/// Whether process `pid` exists (signalling it may still be forbidden: it belongs to
/// another user). Never true for 0 or negative pids, which name process groups.
pub(crate) fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that `pid` (a positive pid,
    // checked above) exists and may be signalled. It touches no memory of ours.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
