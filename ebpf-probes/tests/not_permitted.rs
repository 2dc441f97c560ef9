//! Privilege handling of the `loom-ebpf check` binary: as an unprivileged user it exits 1 with a
//! one-line reason about permissions/capabilities (both from the pre-check and from the kernel's
//! EPERM), without panicking; as root it exits 0.

mod common;

use std::{os::unix::fs::PermissionsExt, path::PathBuf, process::Command};

use common::tool;

/// A copy of the binary in a world-readable temp directory (the build directory may not be
/// reachable for `nobody`), removed on drop.
struct BinCopy {
    dir: PathBuf,
    bin: PathBuf,
}

impl BinCopy {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("loomt-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let bin = dir.join("loom-ebpf");
        std::fs::copy(env!("CARGO_BIN_EXE_loom-ebpf"), &bin).expect("copy binary");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self { dir, bin }
    }
}

impl Drop for BinCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn check_as_nobody_is_not_permitted() {
    let test = "check_as_nobody_is_not_permitted";
    if !nix::unistd::geteuid().is_root() {
        println!("skipping {test}: needs root to switch to an unprivileged user");
        return;
    }
    let Some(setpriv) = tool("setpriv") else {
        println!("skipping {test}: needs setpriv (util-linux)");
        return;
    };
    let copy = BinCopy::new("np");
    for extra in [&[][..], &["--kernel-only"][..]] {
        let out = Command::new(&setpriv)
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(&copy.bin)
            .arg("check")
            .args(extra)
            .output()
            .expect("run setpriv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "check {extra:?}: stdout {stdout:?} stderr {stderr:?}"
        );
        assert_eq!(stdout.lines().count(), 1, "one line: {stdout:?}");
        let line = stdout.trim();
        assert!(line.starts_with("loom-ebpf: not permitted:"), "{line}");
        assert!(
            line.contains("CAP_BPF") || line.contains("permission"),
            "{line}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        println!("check {extra:?} as nobody: {line}");
    }
}

#[test]
fn check_as_root_succeeds() {
    let test = "check_as_root_succeeds";
    if !nix::unistd::geteuid().is_root() {
        println!("skipping {test}: needs root");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_loom-ebpf"))
        .arg("check")
        .output()
        .expect("run loom-ebpf");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
