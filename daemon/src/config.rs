//! What both daemons' `config.rs` share: each setting is declared once (a clap argument that
//! is also a config-file key) and merged once, flags > environment > file > default. Here:
//! reading the file ([`read`]), whether clap took a value from the command line or the
//! environment ([`given`], [`merged!`](crate::merged)), and reading a file value as its flag
//! would be, with the value quoted in the error ([`parsed`], [`parsed_with`]).

use serde::{Deserialize, Deserializer};
use std::fmt::Display;
use std::path::Path;

/// Why the command line or the config file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path:?}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The message names the key and quotes the value (see [`parsed`]).
    #[error("config file {path:?} is invalid: {source}")]
    Invalid {
        path: String,
        source: toml::de::Error,
    },
    #[error(transparent)]
    Args(#[from] clap::Error),
}

/// Reads the config file at `path` (default values when `None`). Unknown keys are errors
/// when `T` says `deny_unknown_fields`.
pub fn read<T: serde::de::DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<T, ConfigFileError> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let name = p.display().to_string();
    let text = std::fs::read_to_string(p).map_err(|source| ConfigFileError::Read {
        path: name.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigFileError::Invalid { path: name, source })
}

/// Whether clap took argument `id` from the command line or the environment: then the file
/// does not override it.
pub fn given(m: &clap::ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    )
}

/// A setting merged: `cli`'s value (flags, environment, clap's default) when [`given`], else
/// `file`'s, else `cli`'s. `merged!(matches, cli, file, a.b; "id")`.
#[macro_export]
macro_rules! merged {
    ($m:expr, $cli:expr, $file:expr, $($field:ident).+ ; $id:expr) => {
        if $crate::config::given($m, $id) {
            $cli.$($field).+.clone()
        } else {
            $file.$($field).+.clone().or($cli.$($field).+.clone())
        }
    };
}

/// A file value read as its flag would be (`FromStr`); the message quotes the value.
pub fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: Display,
{
    parsed_with(d, str::parse::<T>)
}

/// A file value read with `parse` (a flag's value parser); the message quotes the value.
pub fn parsed_with<'de, D, T, E>(
    d: D,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    E: Display,
{
    let s = String::deserialize(d)?;
    parse(&s).map(Some).map_err(|e| quoted(&s, e))
}

/// `e`, quoting `value` unless it does already.
pub fn quoted<E: serde::de::Error>(value: &str, e: impl Display) -> E {
    let msg = e.to_string();
    if msg.contains(&format!("{value:?}")) {
        E::custom(msg)
    } else {
        E::custom(format!("{value:?}: {msg}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct File {
        #[serde(default, deserialize_with = "parsed")]
        port: Option<u16>,
    }

    #[test]
    fn file_values_are_read_as_flags_are_and_errors_quote_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "port = \"80\"\n").unwrap();
        assert_eq!(read::<File>(Some(&p)).unwrap().port, Some(80));
        std::fs::write(&p, "port = \"eighty\"\n").unwrap();
        let e = read::<File>(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("\"eighty\"") && e.contains("c.toml"), "{e}");
        std::fs::write(&p, "colour = \"red\"\n").unwrap();
        let e = read::<File>(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        assert!(read::<File>(None).unwrap().port.is_none());
    }
}
