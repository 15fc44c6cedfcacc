//! `medvl doctor`: what this machine can run, with a next step for each problem.

use std::process::{Command, ExitCode};

fn line(ok: bool, what: &str, detail: &str) {
    println!("{} {what}: {detail}", if ok { "[ok]  " } else { "[fail]" });
}

/// Prints the checks; exits 0 when the compiled backends can run here.
pub fn run() -> anyhow::Result<ExitCode> {
    let cuda_compiled = cfg!(feature = "cuda");
    println!("medvl {}", env!("CARGO_PKG_VERSION"));
    line(
        true,
        "backends compiled in",
        if cuda_compiled {
            "cpu (ndarray, f32), cuda (bf16, f32)"
        } else {
            "cpu (ndarray, f32)"
        },
    );
    if !cuda_compiled {
        line(
            false,
            "cuda",
            "not compiled in; rebuild with `cargo build --release --features cuda` for GPUs",
        );
        return Ok(ExitCode::SUCCESS);
    }
    let smi = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,compute_cap,driver_version,memory.free,memory.total",
            "--format=csv,noheader",
        ])
        .output();
    let mut gpu_ok = false;
    match smi {
        Ok(out) if out.status.success() => {
            for gpu in String::from_utf8_lossy(&out.stdout).lines() {
                let f: Vec<&str> = gpu.split(',').map(str::trim).collect();
                if let [name, cc, driver, free, total] = f[..] {
                    let major: u32 = cc
                        .split('.')
                        .next()
                        .and_then(|m| m.parse().ok())
                        .unwrap_or(0);
                    let supported = major >= 8;
                    line(
                        supported,
                        "gpu",
                        &format!(
                            "{name}, compute capability {cc}, driver {driver}, {free} free of {total}"
                        ),
                    );
                    if !supported {
                        println!(
                            "        bf16 needs compute capability 8.0 or newer (Ampere, Hopper, Blackwell)"
                        );
                    }
                    gpu_ok |= supported;
                }
            }
        }
        Ok(out) => line(
            false,
            "gpu",
            &format!(
                "nvidia-smi failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
        Err(_) => line(
            false,
            "gpu",
            "no NVIDIA driver found (nvidia-smi is missing); install the NVIDIA driver",
        ),
    }
    let nvrtc = find_library("libnvrtc.so");
    line(nvrtc.is_some(), "NVRTC (CUDA runtime compiler)", &nvrtc.unwrap_or_else(|| {
        "not found; install the CUDA toolkit's NVRTC (cuda-nvrtc 12.x or 13.x) or add its lib dir to LD_LIBRARY_PATH".into()
    }));
    let cuda = find_library("libcuda.so");
    line(
        cuda.is_some(),
        "CUDA driver library",
        &cuda.unwrap_or_else(|| "libcuda.so not found; install the NVIDIA driver".into()),
    );
    Ok(if gpu_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The first library whose file name starts with `stem`, from the linker cache or the usual CUDA dirs.
fn find_library(stem: &str) -> Option<String> {
    if let Ok(out) = Command::new("ldconfig").arg("-p").output()
        && let Some(l) = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.trim_start().starts_with(stem))
    {
        return l.rsplit("=> ").next().map(str::to_string);
    }
    let mut dirs: Vec<String> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .map(str::to_string)
        .collect();
    dirs.extend(
        [
            "/usr/local/cuda/lib64",
            "/usr/local/cuda/targets/x86_64-linux/lib",
            "/usr/lib/x86_64-linux-gnu",
        ]
        .map(String::from),
    );
    dirs.iter().filter(|d| !d.is_empty()).find_map(|d| {
        std::fs::read_dir(d)
            .ok()?
            .filter_map(|e| e.ok())
            .find_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.starts_with(stem)
                    .then(|| e.path().display().to_string())
            })
    })
}
