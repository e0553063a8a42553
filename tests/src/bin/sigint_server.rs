//! A server stand-in that counts the SIGINTs it receives, for the test that
//! Ctrl-C on `connlimit exec` reaches the server once: `sigint-server`
//! prints `ready`, and once a SIGINT arrives waits half a second for more,
//! prints `sigints <count>` and exits 0.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

static SIGINTS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_sigint(_: libc::c_int) {
    SIGINTS.fetch_add(1, Ordering::SeqCst);
}

fn main() {
    // SAFETY: the handler only touches an atomic.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
    println!("ready");
    while SIGINTS.load(Ordering::SeqCst) == 0 {
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(500));
    println!("sigints {}", SIGINTS.load(Ordering::SeqCst));
}
