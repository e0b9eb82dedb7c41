//! Writing a changed password hash back into the config file, as webhook-queue's
//! `/setPassword` does: atomically (temp file, fsync, rename) and touching nothing else.
//! TOML keeps its comments and layout (toml_edit); JSON keeps its key order. YAML files
//! are not rewritten (the error says so) because no maintained YAML editor keeps comments.

use std::io::Write;
use std::path::Path;

use super::{Format, Source};
use crate::error::Error;

/// Sets `pass_hash` of user `user` in the config file at `source` to `hash`.
pub fn set_user_pass_hash(source: &Source, user: &str, hash: &str) -> Result<(), Error> {
    let (path, text) = with_user_pass_hash(source, user, hash)?;
    write_atomically(&path, text.as_bytes())
}

/// The config file's text with `pass_hash` of `user` replaced, and the file's path; the
/// caller validates it before [`write_atomically`].
pub fn with_user_pass_hash(
    source: &Source,
    user: &str,
    hash: &str,
) -> Result<(std::path::PathBuf, String), Error> {
    let path = source.path.as_deref().ok_or_else(|| {
        Error::NotWritable("the broker runs on the built-in example config".into())
    })?;
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let updated = match source.format {
        Format::Toml => edit_toml(&text, user, hash)?,
        Format::Json => edit_json(&text, user, hash)?,
        Format::Yaml => {
            return Err(Error::NotWritable(
                "passwords can be written back to TOML and JSON config files, not YAML".into(),
            ))
        }
    };
    Ok((path.to_path_buf(), updated))
}

fn edit_toml(text: &str, user: &str, hash: &str) -> Result<String, Error> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| Error::Parse(e.to_string()))?;
    let mut found = false;
    let users = doc.get_mut("users").ok_or_else(|| no_user(user))?;
    if let Some(tables) = users.as_array_of_tables_mut() {
        if let Some(t) = tables
            .iter_mut()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(user))
        {
            t["pass_hash"] = toml_edit::value(hash);
            found = true;
        }
    } else if let Some(arr) = users.as_array_mut() {
        if let Some(t) = arr
            .iter_mut()
            .filter_map(|v| v.as_inline_table_mut())
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(user))
        {
            t.insert("pass_hash", hash.into());
            found = true;
        }
    }
    if found {
        return Ok(doc.to_string());
    }
    Err(no_user(user))
}

fn edit_json(text: &str, user: &str, hash: &str) -> Result<String, Error> {
    let mut doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::Parse(e.to_string()))?;
    let users = doc
        .get_mut("users")
        .and_then(|u| u.as_array_mut())
        .ok_or_else(|| no_user(user))?;
    let entry = users
        .iter_mut()
        .find(|u| u.get("name").and_then(|n| n.as_str()) == Some(user))
        .ok_or_else(|| no_user(user))?;
    entry["pass_hash"] = serde_json::Value::String(hash.to_owned());
    let mut out = serde_json::to_string_pretty(&doc).expect("a Value always serializes");
    out.push('\n');
    Ok(out)
}

/// Replaces a file by writing a sibling, syncing it and renaming it over the original.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".swap");
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        // Keep the original's permissions: the file holds secrets.
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path, e)
    })
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn no_user(user: &str) -> Error {
    Error::NotWritable(format!(
        "user `{user}` is not defined in the config file (set by an override?)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(path: &Path, format: Format) -> Source {
        Source {
            path: Some(path.to_path_buf()),
            format,
            legacy: false,
        }
    }

    #[test]
    fn toml_keeps_comments_and_changes_only_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        let text = "# top comment\n[[users]]\nname = \"a\" # who\npass_hash = \"plain;;x\"\n\n[[users]]\nname = \"b\"\npass_hash = \"plain;;y\"\n";
        std::fs::write(&p, text).unwrap();
        set_user_pass_hash(&source(&p, Format::Toml), "b", "NEW").unwrap();
        let out = std::fs::read_to_string(&p).unwrap();
        assert_eq!(out, text.replace("plain;;y", "NEW"));
        assert!(!dir.path().join("b.toml.swap").exists());
    }

    #[test]
    fn json_keeps_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("options.conf");
        std::fs::write(
            &p,
            r#"{"listen_host":"x","users":[{"name":"a","pass_hash":"plain;;x","queues":[]}]}"#,
        )
        .unwrap();
        set_user_pass_hash(&source(&p, Format::Json), "a", "NEW").unwrap();
        let out = std::fs::read_to_string(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["users"][0]["pass_hash"], "NEW");
        assert!(out.find("listen_host").unwrap() < out.find("users").unwrap());
    }

    #[test]
    fn unknown_user_and_yaml_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        std::fs::write(&p, "[[users]]\nname = \"a\"\npass_hash = \"x\"\n").unwrap();
        assert!(matches!(
            set_user_pass_hash(&source(&p, Format::Toml), "zz", "h"),
            Err(Error::NotWritable(_))
        ));
        assert!(matches!(
            set_user_pass_hash(&source(&p, Format::Yaml), "a", "h"),
            Err(Error::NotWritable(_))
        ));
    }
}
