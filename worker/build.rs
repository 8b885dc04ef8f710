//! With the `cuda` feature, compiles herd's CUDA kernels to PTX with nvcc (the CUDA toolkit's
//! compiler, which candle's own kernels need as well); the PTX is loaded at run time.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=kernels/paged_attention.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("paged_attention.ptx");
    // PTX for a compute capability runs on that GPU generation and later ones (the driver
    // compiles it once, into CUDA's JIT cache).
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", &format!("-arch=compute_{cap}"), "-O3", "-o"])
        .arg(&out)
        .arg("kernels/paged_attention.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed ({s}) compiling kernels/paged_attention.cu"),
        Err(e) => {
            panic!("cannot run {nvcc} ({e}): building with --features cuda needs the CUDA toolkit's nvcc on PATH")
        }
    }
}
