//! Sets `cfg(as_root)` when the package is built by root.
//!
//! Tests that act as root against a throwaway unprivileged user carry
//! `#[cfg_attr(not(as_root), ignore = "needs root ...")]`: built without
//! root they are reported as *ignored* by the test runner, never counted as
//! passes. CI builds and runs the suite as root, so they run there.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(as_root)");
    println!("cargo::rerun-if-changed=build.rs");
    // Rebuilt when the user changes (the file the build sees differs).
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_UID");
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let uids = line.strip_prefix("Uid:")?;
                uids.split_whitespace().nth(1).map(|euid| euid == "0")
            })
        })
        .unwrap_or(false);
    if root {
        println!("cargo::rustc-cfg=as_root");
    }
}
