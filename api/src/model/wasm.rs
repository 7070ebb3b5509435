//! WASM binary validation shared by the CLI (before upload) and the hub (at apply), so both
//! reject a bad module with the same words.

/// Why bytes are not a WASM module or component; one line, for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidWasm {
    #[error("not a WebAssembly binary (it does not start with the \\0asm magic number)")]
    NotWasm,
    #[error("{message} (at byte offset {offset:#x})")]
    Malformed { message: String, offset: usize },
}

/// `Ok` if `bytes` is a valid WASM core module or component (any proposal wasmtime may enable).
pub fn validate(bytes: &[u8]) -> Result<(), InvalidWasm> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(InvalidWasm::NotWasm);
    }
    let mut v = wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all());
    v.validate_all(bytes)
        .map(|_| ())
        .map_err(|e| InvalidWasm::Malformed {
            message: e.message().split_whitespace().collect::<Vec<_>>().join(" "),
            offset: e.offset(),
        })
}

/// A core module or a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Module,
    Component,
}

/// Validates `bytes` (as [`validate`]) and tells a core module from a component by the
/// version/layer field after the magic number.
pub fn kind(bytes: &[u8]) -> Result<Kind, InvalidWasm> {
    validate(bytes)?;
    Ok(if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
        Kind::Module
    } else {
        Kind::Component
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_table() {
        assert_eq!(validate(b"\0asm\x01\0\0\0"), Ok(()));
        assert_eq!(kind(b"\0asm\x01\0\0\0"), Ok(Kind::Module));
        assert_eq!(kind(b"\0asm\x0d\0\x01\0"), Ok(Kind::Component));
        assert!(validate(b"hello world")
            .unwrap_err()
            .to_string()
            .starts_with("not a WebAssembly binary"));
        // Right magic, unknown version.
        let e = validate(b"\0asm\x09\0\0\0").unwrap_err().to_string();
        assert!(e.contains("at byte offset"), "{e}");
        // Truncated section.
        assert!(validate(b"\0asm\x01\0\0\0\x01\x05").is_err());
    }
}
