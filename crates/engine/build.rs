//! With the `cuda` feature: compiles `kernels/*.cu` ahead of time into fat binaries with
//! SASS for the GPUs people run Stable Diffusion on (sm_80 A100, sm_86 RTX 30xx/A10,
//! sm_89 RTX 40xx/L4/L40, sm_90 H100/H200, and sm_90a for the Hopper-only kernels) and PTX
//! for anything newer, so a worker never waits for the driver to compile them. nvcc comes from `NVCC`, `$CUDA_HOME/bin` or `PATH`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Each source with the GPUs it is built for: the portable kernels for every architecture
/// above, the Hopper ones (`wgmma`) for sm_90a only.
const KERNELS: &[(&str, &[&str])] = &[("fused", &["80", "86", "89", "90"]), ("hopper", &["90a"])];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| env::var_os("CUDA_HOME").map(|home| PathBuf::from(home).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for (kernel, archs) in KERNELS {
        let source = format!("kernels/{kernel}.cu");
        let target = out.join(format!("{kernel}.fatbin"));
        let mut command = Command::new(&nvcc);
        command.args(["--fatbin", "-O3", "-std=c++17", "--use_fast_math"]);
        for arch in *archs {
            command.arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
        }
        if archs.contains(&"90") {
            // PTX for GPUs newer than any listed.
            command.arg("-gencode=arch=compute_90,code=compute_90");
        }
        command.arg("-o").arg(&target).arg(&source);
        let status = command.status().unwrap_or_else(|e| {
            panic!(
                "cannot run {} to build {source} (set NVCC or CUDA_HOME): {e}",
                nvcc.display()
            )
        });
        assert!(status.success(), "nvcc failed on {source}");
    }
}
