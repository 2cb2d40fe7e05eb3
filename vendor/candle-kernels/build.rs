use cudaforge::{KernelBuilder, Result};
use std::env;
use std::path::PathBuf;

const CUTILE_FEATURE: &str = "CARGO_FEATURE_CUTILE";

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=src/compatibility.cuh");
    println!("cargo::rerun-if-changed=src/cuda_utils.cuh");
    println!("cargo::rerun-if-changed=src/binary_op_macros.cuh");

    // Build for PTX
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let ptx_path = out_dir.join("ptx.rs");
    let bindings = KernelBuilder::new()
        .source_dir("src") // Scan src/ for .cu files
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"]) // Exclude statically compiled kernels from ptx build
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;

    bindings.write(&ptx_path)?;
    build_images(&out_dir);

    let mut moe_sources = vec![
        "src/moe/moe_gguf.cu",
        "src/moe/moe_wmma.cu",
        "src/moe/moe_wmma_gguf.cu",
        "src/mmvq_gguf.cu",
        "src/mmq_gguf/mmq_quantize.cu",
        "src/mmq_gguf/mmq_instance_q4_0.cu",
        "src/mmq_gguf/mmq_instance_q4_1.cu",
        "src/mmq_gguf/mmq_instance_q5_0.cu",
        "src/mmq_gguf/mmq_instance_q5_1.cu",
        "src/mmq_gguf/mmq_instance_q8_0.cu",
        "src/mmq_gguf/mmq_instance_q2_k.cu",
        "src/mmq_gguf/mmq_instance_q3_k.cu",
        "src/mmq_gguf/mmq_instance_q4_k.cu",
        "src/mmq_gguf/mmq_instance_q5_k.cu",
        "src/mmq_gguf/mmq_instance_q6_k.cu",
    ];
    if env::var_os(CUTILE_FEATURE).is_some() {
        moe_sources.push("src/moe/moe_align.cu");
    }

    let mut moe_builder = KernelBuilder::default()
        .source_files(moe_sources)
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3");

    // Disable bf16 WMMA kernels on GPUs older than sm_80 (Ampere).
    // bf16 WMMA fragments require compute capability >= 8.0.
    let compute_cap = cudaforge::detect_compute_cap()
        .map(|arch| arch.base())
        .unwrap_or(80);
    if compute_cap < 80 {
        moe_builder = moe_builder.arg("-DNO_BF16_KERNEL");
    }

    let mut is_target_msvc = false;
    if let Ok(target) = std::env::var("TARGET") {
        if target.contains("msvc") {
            is_target_msvc = true;
            moe_builder = moe_builder.arg("-D_USE_MATH_DEFINES");
        }
    }

    if !is_target_msvc {
        moe_builder = moe_builder.arg("-Xcompiler").arg("-fPIC");
    }

    moe_builder.build_lib(out_dir.join("libmoe.a"))?;
    println!("cargo:rustc-link-search={}", out_dir.display());
    println!("cargo:rustc-link-lib=moe");
    println!("cargo:rustc-link-lib=dylib=cudart");
    if !is_target_msvc {
        println!("cargo:rustc-link-lib=stdc++");
    }
    Ok(())
}

/// Modules compiled ahead of time into fat binaries: SASS for sm_80, sm_86, sm_89 and sm_90
/// plus compute_90 PTX for newer GPUs, so loading one never waits for the driver's PTX
/// compiler. `quantized` stays PTX only (large, and loaded only for GGUF models).
const IMAGES: &[&str] = &[
    "affine", "binary", "cast", "conv", "fill", "indexing", "reduce", "sort", "ternary", "unary",
];

fn build_images(out_dir: &std::path::Path) {
    println!("cargo::rerun-if-env-changed=CANDLE_KERNELS_SASS");
    let nvcc = env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| env::var_os("CUDA_HOME").map(|home| PathBuf::from(home).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let enabled = env::var("CANDLE_KERNELS_SASS").map_or(true, |v| v != "0");
    let jobs: Vec<_> = IMAGES
        .iter()
        .filter(|_| enabled)
        .map(|name| {
            let nvcc = nvcc.clone();
            let target = out_dir.join(format!("{name}.fatbin"));
            let name = name.to_string();
            std::thread::spawn(move || {
                let mut command = std::process::Command::new(&nvcc);
                command.args([
                    "--fatbin",
                    "-O3",
                    "-std=c++17",
                    "--expt-relaxed-constexpr",
                    "-Isrc",
                ]);
                for arch in ["80", "86", "89", "90"] {
                    command.arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
                }
                command.arg("-gencode=arch=compute_90,code=compute_90");
                command.arg("-o").arg(&target).arg(format!("src/{name}.cu"));
                let status = command
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
                assert!(status.success(), "nvcc failed on src/{name}.cu");
                (name, target)
            })
        })
        .collect();
    let mut images = String::new();
    for job in jobs {
        let (name, target) = job.join().expect("nvcc thread");
        images.push_str(&format!(
            "pub const {}: &[u8] = include_bytes!({:?});\n",
            name.to_uppercase(),
            target
        ));
    }
    for name in IMAGES.iter().filter(|_| !enabled).chain(["quantized"].iter()) {
        images.push_str(&format!("pub const {}: &[u8] = &[];\n", name.to_uppercase()));
    }
    std::fs::write(out_dir.join("images.rs"), images).expect("write images.rs");
}
