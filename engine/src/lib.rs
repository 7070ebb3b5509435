//! The wasmtime engine settings shared by the agent, which runs modules, and the hub, which
//! precompiles them for runtime-only agents (built without Cranelift, for the smallest boards).
//!
//! A precompiled artifact loads only into an engine of a compatible wasmtime release with the
//! same settings, for the same target. Both sides therefore build their [`wasmtime::Config`]
//! here ([`config`]), which stamps artifacts with [`ENGINE_ID`] instead of wasmtime's own
//! version string; an agent names what it needs by that id and its [`native_target`], and
//! wasmtime checks the stamp, target and settings again when it loads an artifact.

/// The wasmtime major release this workspace pins (`=48.0.8` in the workspace `Cargo.toml`).
/// wasmtime itself treats artifacts of one major release as compatible; a unit test checks
/// that its own stamp still says this.
pub const WASMTIME_MAJOR: &str = "48";

/// Bumped whenever [`config`] changes what it sets, so a hub and an agent that build
/// different engines never exchange artifacts.
pub const CONFIG_REVISION: u32 = 1;

/// The stamp of every artifact a Shoal engine compiles, and what a runtime-only agent asks
/// for: the wasmtime major release and the revision of Shoal's settings.
pub const ENGINE_ID: &str = "wasmtime-48+shoal.1";

/// Why an engine could not be configured.
#[derive(Debug, thiserror::Error)]
#[error("cannot configure the wasm engine: {0}")]
pub struct ConfigError(String);

/// The engine settings every Shoal engine uses: artifacts stamped with [`ENGINE_ID`], and
/// epoch interruption (how the agent preempts guests). Async support is always on in wasmtime
/// 48 (`Config::async_support` is a deprecated no-op).
pub fn config() -> Result<wasmtime::Config, ConfigError> {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    config
        .module_version(wasmtime::ModuleVersionStrategy::Custom(
            ENGINE_ID.to_string(),
        ))
        .map_err(|e| ConfigError(format!("{e:#}")))?;
    Ok(config)
}

/// The target this build's engine runs code for: its own triple (`aarch64-unknown-linux-gnu`),
/// or Pulley's where Cranelift has no backend and wasmtime interprets (`pulley32` on armv7).
pub fn native_target(engine: &wasmtime::Engine) -> String {
    if engine.is_pulley() {
        let bits = if cfg!(target_pointer_width = "64") {
            "64"
        } else {
            "32"
        };
        let endian = if cfg!(target_endian = "big") {
            "be"
        } else {
            ""
        };
        format!("pulley{bits}{endian}")
    } else {
        env!("SHOAL_ENGINE_TARGET").to_string()
    }
}

/// The targets a hub compiles artifacts for, as agents name them ([`native_target`]): the
/// Linux triples Shoal's agents are built for, and Pulley's. Anything else is refused before
/// any compiling (each new target would be a new Cranelift compile, and a new cache entry).
pub const KNOWN_TARGETS: &[&str] = &[
    "x86_64-unknown-linux-gnu",
    "x86_64-unknown-linux-musl",
    "aarch64-unknown-linux-gnu",
    "aarch64-unknown-linux-musl",
    "riscv64gc-unknown-linux-gnu",
    "s390x-unknown-linux-gnu",
    "pulley32",
    "pulley64",
    "pulley32be",
    "pulley64be",
];

/// `target` as one of [`KNOWN_TARGETS`] (ASCII case and surrounding space ignored), or
/// `None`.
pub fn known_target(target: &str) -> Option<&'static str> {
    let t = target.trim();
    KNOWN_TARGETS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(t))
        .copied()
}

/// Whether a device whose Rust `std::env::consts::ARCH` is `arch` runs code for `target`
/// (a known target): its own architecture's triples, or Pulley of its pointer width, which
/// wasmtime interprets where Cranelift has no backend.
pub fn target_fits(target: &str, arch: &str) -> bool {
    let t_arch = target.split('-').next().unwrap_or_default();
    match t_arch {
        "pulley32" | "pulley32be" => matches!(arch, "arm" | "x86" | "mips" | "powerpc" | "riscv32"),
        "pulley64" | "pulley64be" => matches!(
            arch,
            "x86_64" | "aarch64" | "riscv64" | "s390x" | "powerpc64" | "mips64" | "loongarch64"
        ),
        "riscv64gc" => arch == "riscv64",
        other => other == arch,
    }
}

/// Why a module could not be precompiled.
#[derive(Debug, thiserror::Error)]
pub enum PrecompileError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("target {target:?} is not one wasmtime can compile for: {reason}")]
    Target { target: String, reason: String },
    #[error("invalid module: {0}")]
    Invalid(String),
}

/// Compiles `bytes` (a core module or a component) for `target` with the shared settings,
/// returning the serialized artifact an engine of [`ENGINE_ID`] on that target loads with
/// `Module::deserialize`/`Component::deserialize`.
#[cfg(feature = "compiler")]
pub fn precompile(bytes: &[u8], target: &str) -> Result<Vec<u8>, PrecompileError> {
    let bad_target = |e: wasmtime::Error| PrecompileError::Target {
        target: target.to_string(),
        reason: format!("{e:#}"),
    };
    use shoal_api::model::wasm::Kind;
    let mut config = config()?;
    config.target(target).map_err(bad_target)?;
    let engine = wasmtime::Engine::new(&config).map_err(bad_target)?;
    let kind =
        shoal_api::model::wasm::kind(bytes).map_err(|e| PrecompileError::Invalid(e.to_string()))?;
    let compiled = match kind {
        Kind::Module => engine.precompile_module(bytes),
        Kind::Component => engine.precompile_component(bytes),
    };
    compiled.map_err(|e| PrecompileError::Invalid(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_id_names_the_release_and_revision() {
        assert_eq!(
            ENGINE_ID,
            format!("wasmtime-{WASMTIME_MAJOR}+shoal.{CONFIG_REVISION}")
        );
    }

    #[test]
    fn only_known_targets_and_each_device_its_own() {
        assert_eq!(
            known_target(" X86_64-unknown-linux-gnu "),
            Some("x86_64-unknown-linux-gnu")
        );
        for made_up in [
            "x86_64-evil-linux-gnu",
            "i686-pc-windows-msvc",
            "../../etc",
            "",
            "pulley16",
        ] {
            assert_eq!(known_target(made_up), None, "{made_up}");
        }
        // (target, device arch, fits)
        for (t, arch, fits) in [
            ("x86_64-unknown-linux-gnu", "x86_64", true),
            ("aarch64-unknown-linux-gnu", "x86_64", false),
            ("aarch64-unknown-linux-musl", "aarch64", true),
            ("pulley32", "arm", true),
            ("pulley32", "aarch64", false),
            ("pulley64", "aarch64", true),
            ("riscv64gc-unknown-linux-gnu", "riscv64", true),
        ] {
            assert_eq!(target_fits(t, arch), fits, "{t} on {arch}");
        }
    }

    #[test]
    fn native_target_is_this_build_s() {
        let engine = wasmtime::Engine::new(&config().unwrap()).unwrap();
        let target = native_target(&engine);
        if engine.is_pulley() {
            assert!(target.starts_with("pulley"), "{target}");
        } else {
            assert!(target.starts_with(std::env::consts::ARCH), "{target}");
        }
        // What this build asks for is known, and fits it.
        assert_eq!(known_target(&target), Some(target.as_str()));
        assert!(target_fits(&target, std::env::consts::ARCH));
    }

    /// The smallest WASI-less core module: `(module (func (export "f")))`.
    #[cfg(feature = "compiler")]
    const TINY: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type section: () -> ()
        0x03, 0x02, 0x01, 0x00, // function section
        0x07, 0x05, 0x01, 0x01, b'f', 0x00, 0x00, // export "f"
        0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code: empty body
    ];

    /// Whether `artifact`'s engine section (a format byte, a length byte, the stamp) carries
    /// `stamp`.
    #[cfg(feature = "compiler")]
    fn stamped(artifact: &[u8], stamp: &str) -> bool {
        let mut needle = vec![0u8, stamp.len() as u8];
        needle.extend_from_slice(stamp.as_bytes());
        artifact.windows(needle.len()).any(|w| w == needle)
    }

    #[cfg(feature = "compiler")]
    #[test]
    fn artifacts_carry_the_engine_id_and_load_only_into_a_shoal_engine() {
        let host = env!("SHOAL_ENGINE_TARGET");
        let bytes = precompile(TINY, host).unwrap();
        assert!(stamped(&bytes, ENGINE_ID));
        // This build's own engine loads it; a plain wasmtime engine refuses it, naming it.
        let engine = wasmtime::Engine::new(&config().unwrap()).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: the bytes were produced just above by wasmtime for this very configuration.
        let module = unsafe { wasmtime::Module::deserialize(&engine, &bytes) }.unwrap();
        assert!(module.get_export("f").is_some());
        let mut plain = wasmtime::Config::new();
        plain.epoch_interruption(true);
        let plain = wasmtime::Engine::new(&plain).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: as above; wasmtime rejects it before using it.
        let e = unsafe { wasmtime::Module::deserialize(&plain, &bytes) }.unwrap_err();
        assert!(format!("{e:#}").contains(ENGINE_ID), "{e:#}");
        // wasmtime's own stamp is still its major release, which WASMTIME_MAJOR must name.
        let own = plain.precompile_module(TINY).unwrap();
        assert!(
            stamped(&own, WASMTIME_MAJOR),
            "wasmtime no longer stamps {WASMTIME_MAJOR}: update WASMTIME_MAJOR and ENGINE_ID"
        );
    }

    #[cfg(feature = "cross")]
    #[test]
    fn precompiles_for_other_targets_and_names_bad_ones() {
        for target in [
            "aarch64-unknown-linux-gnu",
            "pulley32",
            "x86_64-unknown-linux-gnu",
        ] {
            let bytes = precompile(TINY, target).unwrap();
            assert!(
                wasmtime::Engine::detect_precompiled(&bytes).is_some(),
                "{target}"
            );
        }
        let e = precompile(TINY, "vax-dec-ultrix").unwrap_err().to_string();
        assert!(e.contains("\"vax-dec-ultrix\""), "{e}");
        let e = precompile(b"\0asm\x01\0\0\0\x05", "pulley32")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid module"), "{e}");
    }
}
