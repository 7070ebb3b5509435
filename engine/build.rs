//! Records the target triple this crate is built for, which Cargo only tells build scripts:
//! a runtime-only agent asks the hub for modules precompiled for it.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=SHOAL_ENGINE_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
