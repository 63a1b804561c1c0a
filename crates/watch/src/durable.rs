//! Small files the server writes outside its databases (the admin token, TLS
//! certificates and keys from ACME, DKIM keys), replaced whole or not at all.
//!
//! Why here: these were written in three places by truncating the file in place and
//! writing it again, so a crash or a full disk in between left an empty or half key, and
//! the next start failed to load it (a certificate) or served a different token. This is
//! the crate every part already depends on, so the one correct version lives here.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` so that after a crash at any point the file holds either
/// its old contents or the new ones: a temporary file beside it is written and fsynced,
/// renamed over `path`, and the folder is fsynced so the rename itself survives a power
/// loss. `private` makes the file readable by its owner only (keys, tokens); otherwise it
/// is readable by all (certificates, DNS records).
pub fn write_replacing(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let mut temporary = name.to_os_string();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = dir.join(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let written = (|| {
        let mut file = options.open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_with_its_mode_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_replacing(&path, b"first", true).unwrap();
        write_replacing(&path, b"second, longer", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "a private file is its owner's only: {mode:o}"
            );
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_replacing(&path, b"old", true).unwrap();
        // A folder where the temporary file would go makes the write fail midway.
        let blocker = dir.path().join(format!("token.{}.tmp", std::process::id()));
        std::fs::create_dir(&blocker).unwrap();
        assert!(write_replacing(&path, b"new", true).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
