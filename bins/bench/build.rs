//! Records the versions of burn and CubeCL this binary is built with (from the workspace's `Cargo.lock`), for the
//! environment section of the benchmark reports.

fn main() {
    let lock = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    for (name, var) in [
        ("burn", "MEDVL_BURN_VERSION"),
        ("cubecl", "MEDVL_CUBECL_VERSION"),
    ] {
        let needle = format!("name = \"{name}\"\nversion = \"");
        let version = text
            .find(&needle)
            .map(|at| &text[at + needle.len()..])
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("unknown");
        println!("cargo:rustc-env={var}={version}");
    }
}
