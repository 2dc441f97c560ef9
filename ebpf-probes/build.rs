//! Build script: compiles `bpf/loom_probes.bpf.c` with clang into `$OUT_DIR/loom_probes.bpf.o`.
//!
//! When clang is missing, fails, or `LOOM_EBPF_NO_CLANG=1` is set, the committed object
//! `bpf/loom_probes.bpf.o` (built by `bpf/build-object.sh` with the same command) is copied
//! instead and a `cargo:warning` says so. `LOOM_EBPF_CLANG` names another clang binary.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const SOURCE: &str = "bpf/loom_probes.bpf.c";
const COMMITTED: &str = "bpf/loom_probes.bpf.o";
const OBJECT: &str = "loom_probes.bpf.o";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={COMMITTED}");
    println!("cargo:rerun-if-changed=bpf/build-object.sh");
    println!("cargo:rerun-if-env-changed=LOOM_EBPF_NO_CLANG");
    println!("cargo:rerun-if-env-changed=LOOM_EBPF_CLANG");

    let out_dir = match env::var_os("OUT_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => fail("OUT_DIR is not set"),
    };
    let out = out_dir.join(OBJECT);
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());

    let no_clang = env::var("LOOM_EBPF_NO_CLANG").is_ok_and(|v| !v.is_empty() && v != "0");
    let reason = if no_clang {
        "LOOM_EBPF_NO_CLANG is set".to_string()
    } else {
        match compile(&manifest_dir, &out) {
            Ok(()) => {
                println!("cargo:rustc-env=LOOM_EBPF_OBJECT_SOURCE=clang");
                warn_if_committed_differs(&manifest_dir.join(COMMITTED), &out);
                return;
            }
            Err(reason) => reason,
        }
    };

    let committed = manifest_dir.join(COMMITTED);
    if let Err(e) = std::fs::copy(&committed, &out) {
        fail(&format!(
            "{reason}, and the committed object {} cannot be copied: {e}",
            committed.display()
        ));
    }
    println!("cargo:rustc-env=LOOM_EBPF_OBJECT_SOURCE=committed");
    println!(
        "cargo:warning=loom-ebpf-probes: {reason}; using the committed eBPF object {COMMITTED} \
         (regenerate it with ebpf-probes/bpf/build-object.sh)"
    );
}

/// Runs clang exactly as `bpf/build-object.sh` does.
fn compile(manifest_dir: &Path, out: &Path) -> Result<(), String> {
    let clang = env::var("LOOM_EBPF_CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_string());
    let (target_arch_define, multiarch) = match arch.as_str() {
        "x86_64" => ("x86", "x86_64-linux-gnu"),
        "aarch64" => ("arm64", "aarch64-linux-gnu"),
        "riscv64" => ("riscv", "riscv64-linux-gnu"),
        "powerpc64" => ("powerpc", "powerpc64le-linux-gnu"),
        "s390x" => ("s390", "s390x-linux-gnu"),
        "loongarch64" => ("loongarch", "loongarch64-linux-gnu"),
        other => (other, "x86_64-linux-gnu"),
    };
    let bpf_dir = manifest_dir.join("bpf");
    let output = Command::new(&clang)
        .current_dir(&bpf_dir)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        // Keeps the checkout path out of the debug info, so the object is reproducible.
        .arg(format!("-fdebug-prefix-map={}=.", bpf_dir.display()))
        .arg(format!("-D__TARGET_ARCH_{target_arch_define}"))
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", "loom_probes.bpf.c", "-o"])
        .arg(out)
        .output()
        .map_err(|e| format!("cannot run `{clang}` ({e})"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    // A broken source must not silently fall back to a stale object when clang is present.
    if stderr.contains("error:") && !stderr.contains("file not found") {
        fail(&format!("clang failed to compile {SOURCE}:\n{stderr}"));
    }
    Err(format!(
        "`{clang}` could not compile {SOURCE} ({}: {first})",
        output.status
    ))
}

/// The committed fallback should be exactly what clang builds here (same clang and headers):
/// say so when it is not, since it is then stale or built by another clang.
fn warn_if_committed_differs(committed: &Path, built: &Path) {
    let same = match (std::fs::read(committed), std::fs::read(built)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        println!(
            "cargo:warning=loom-ebpf-probes: the committed fallback {COMMITTED} differs from the \
             object clang just built (stale, or another clang/libbpf version): regenerate it \
             with ebpf-probes/bpf/build-object.sh"
        );
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("loom-ebpf-probes build: {msg}");
    std::process::exit(1);
}
