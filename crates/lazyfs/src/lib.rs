//! A FUSE pass-through filesystem that loses, when the "power" goes, every write that
//! was not made durable by fsync (in the spirit of LazyFS). Mailroom's power-loss tests
//! run the server on it.
//!
//! Why: kill -9 keeps the kernel's page cache, so it never tests what fsync promises.
//! Here every write reaches the backing folder at once (so the server reads what it
//! wrote), but the filesystem remembers, per file, what each unsynced write overwrote
//! and how long the file was at its last fsync. [`Mounted::power_loss`] then unmounts
//! (dropping the kernel's cache of the files) and puts every file back as it was at its
//! last fsync: the state a disk would hold after the power went.
//!
//! Model, stated so tests know what they prove: file data and size are durable only
//! through `fsync`/`fdatasync` of that file; creating, renaming and deleting files and
//! folders are durable at once (a journaling filesystem's metadata; SQLite in WAL mode
//! creates its files once and never relies on a rename). Writes arriving after the
//! power went fail with EIO. One request at a time (fuser's session loop): slow, exact.

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TTL: Duration = Duration::from_secs(0);

/// What one file needs to go back to its last fsync.
struct Pending {
    path: PathBuf,
    /// Its length at the last fsync (or when first written since).
    durable_len: u64,
    /// (offset, bytes there before) of each unsynced write, oldest first.
    undo: Vec<(u64, Vec<u8>)>,
}

#[derive(Default)]
struct State {
    /// FUSE inode -> backing path.
    paths: HashMap<u64, PathBuf>,
    /// Open handles: fh -> (inode, file).
    handles: HashMap<u64, (u64, File)>,
    next_fh: u64,
    /// Unsynced changes per inode.
    pending: HashMap<u64, Pending>,
    power_lost: bool,
    fsyncs: u64,
}

/// What a power loss took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerLoss {
    /// Files put back to their last fsync.
    pub files: usize,
    /// Bytes of unsynced writes undone (overwrites put back, growth cut off).
    pub bytes: u64,
    /// Fsyncs the filesystem saw while mounted.
    pub fsyncs: u64,
}

struct LazyFs {
    root_ino: u64,
    state: Arc<Mutex<State>>,
}

/// The mounted filesystem.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    state: Arc<Mutex<State>>,
}

/// Mounts a lazy view of `backing` on `mountpoint` (root, or fusermount3).
pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<Mounted> {
    let meta = std::fs::metadata(backing)?;
    let state = Arc::new(Mutex::new(State::default()));
    state
        .lock()
        .unwrap()
        .paths
        .insert(fuser::FUSE_ROOT_ID, backing.to_path_buf());
    let fs = LazyFs {
        root_ino: meta.ino(),
        state: state.clone(),
    };
    let session = fuser::spawn_mount2(
        fs,
        mountpoint,
        &[
            MountOption::FSName("mailroom-lazyfs".into()),
            MountOption::DefaultPermissions,
        ],
    )?;
    Ok(Mounted {
        session: Some(session),
        state,
    })
}

impl Mounted {
    /// The power goes: later writes fail, the filesystem is unmounted, and every file
    /// returns to its state at its last fsync. Stop the processes using it first.
    pub fn power_loss(mut self) -> std::io::Result<PowerLoss> {
        self.state.lock().unwrap().power_lost = true;
        if let Some(session) = self.session.take() {
            stop(session);
        }
        let mut state = self.state.lock().unwrap();
        state.handles.clear();
        let mut report = PowerLoss {
            fsyncs: state.fsyncs,
            ..PowerLoss::default()
        };
        for (_, pending) in state.pending.drain() {
            let file = match OpenOptions::new().write(true).open(&pending.path) {
                Ok(file) => file,
                // Deleted since: nothing to put back.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for (offset, old) in pending.undo.iter().rev() {
                file.write_all_at(old, *offset)?;
                report.bytes += old.len() as u64;
            }
            let len = file.metadata()?.len();
            report.bytes += len.saturating_sub(pending.durable_len);
            file.set_len(pending.durable_len)?;
            file.sync_all()?;
            report.files += 1;
        }
        Ok(report)
    }

    /// An orderly unmount: everything written is kept.
    pub fn unmount(mut self) {
        if let Some(session) = self.session.take() {
            stop(session);
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            stop(session);
        }
    }
}

/// Unmounts and waits for the session thread. `BackgroundSession::join` panics when the
/// session ends with an error, and an unmount may end it with ECONNABORTED (seen once in
/// 207 cycles): that is the end we asked for, not a failure.
fn stop(mut session: fuser::BackgroundSession) {
    let thread = std::mem::replace(&mut session.guard, std::thread::spawn(|| Ok(())));
    drop(session);
    let _ = thread.join();
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

impl LazyFs {
    fn ino_of(&self, meta: &std::fs::Metadata) -> u64 {
        if meta.ino() == self.root_ino {
            fuser::FUSE_ROOT_ID
        } else {
            meta.ino()
        }
    }

    fn attr(&self, meta: &std::fs::Metadata) -> FileAttr {
        let kind = if meta.is_dir() {
            FileType::Directory
        } else if meta.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        FileAttr {
            ino: self.ino_of(meta),
            size: meta.size(),
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: meta.blksize() as u32,
            flags: 0,
        }
    }

    fn path(&self, ino: u64) -> Option<PathBuf> {
        self.state.lock().unwrap().paths.get(&ino).cloned()
    }

    /// Registers `path` and answers with its attributes.
    fn entry(&self, path: PathBuf) -> Result<FileAttr, i32> {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
        let attr = self.attr(&meta);
        self.state.lock().unwrap().paths.insert(attr.ino, path);
        Ok(attr)
    }

    /// Before `len` bytes at `offset` of `ino` change: remembers what was there.
    fn remember(state: &mut State, ino: u64, path: &Path, file: &File, offset: u64, len: u64) {
        let current = file.metadata().map(|m| m.len()).unwrap_or(0);
        let pending = state.pending.entry(ino).or_insert_with(|| Pending {
            path: path.to_path_buf(),
            durable_len: current,
            undo: Vec::new(),
        });
        let end = (offset + len).min(current);
        if offset < end {
            let mut old = vec![0u8; (end - offset) as usize];
            if file.read_exact_at(&mut old, offset).is_ok() {
                pending.undo.push((offset, old));
            }
        }
    }
}

impl Filesystem for LazyFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.path(parent) else {
            return reply.error(libc::ENOENT);
        };
        match self.entry(dir.join(name)) {
            Ok(attr) => reply.entry(&TTL, &attr, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let Some(path) = self.path(ino) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => reply.attr(&TTL, &self.attr(&meta)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(path) = self.path(ino) else {
            return reply.error(libc::ENOENT);
        };
        if let Some(mode) = mode
            && let Err(e) =
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
        {
            return reply.error(errno(&e));
        }
        if let Some(size) = size {
            let mut state = self.state.lock().unwrap();
            if state.power_lost {
                return reply.error(libc::EIO);
            }
            let file = match OpenOptions::new().write(true).read(true).open(&path) {
                Ok(file) => file,
                Err(e) => return reply.error(errno(&e)),
            };
            let current = file.metadata().map(|m| m.len()).unwrap_or(0);
            // A shrink loses the tail: remember it.
            Self::remember(
                &mut state,
                ino,
                &path,
                &file,
                size,
                current.saturating_sub(size),
            );
            if let Err(e) = file.set_len(size) {
                return reply.error(errno(&e));
            }
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => reply.attr(&TTL, &self.attr(&meta)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let Some(dir) = self.path(parent) else {
            return reply.error(libc::ENOENT);
        };
        let path = dir.join(name);
        if let Err(e) = std::fs::create_dir(&path) {
            return reply.error(errno(&e));
        }
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777));
        match self.entry(path) {
            Ok(attr) => reply.entry(&TTL, &attr, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(dir) = self.path(parent) else {
            return reply.error(libc::ENOENT);
        };
        let path = dir.join(name);
        let ino = std::fs::symlink_metadata(&path).map(|m| self.ino_of(&m));
        match std::fs::remove_file(&path) {
            Ok(()) => {
                if let Ok(ino) = ino {
                    let mut state = self.state.lock().unwrap();
                    state.pending.remove(&ino);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(dir) = self.path(parent) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::remove_dir(dir.join(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let (Some(from_dir), Some(to_dir)) = (self.path(parent), self.path(newparent)) else {
            return reply.error(libc::ENOENT);
        };
        let (from, to) = (from_dir.join(name), to_dir.join(newname));
        let replaced = std::fs::symlink_metadata(&to).map(|m| self.ino_of(&m));
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                let mut state = self.state.lock().unwrap();
                if let Ok(ino) = replaced {
                    state.pending.remove(&ino);
                }
                if let Ok(meta) = std::fs::symlink_metadata(&to) {
                    let ino = self.ino_of(&meta);
                    state.paths.insert(ino, to.clone());
                    if let Some(pending) = state.pending.get_mut(&ino) {
                        pending.path = to;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some(path) = self.path(ino) else {
            return reply.error(libc::ENOENT);
        };
        let access = flags & libc::O_ACCMODE;
        let file = OpenOptions::new()
            .read(access == libc::O_RDONLY || access == libc::O_RDWR)
            .write(access == libc::O_WRONLY || access == libc::O_RDWR)
            .open(&path);
        match file {
            Ok(file) => {
                let mut state = self.state.lock().unwrap();
                state.next_fh += 1;
                let fh = state.next_fh;
                state.handles.insert(fh, (ino, file));
                reply.opened(fh, 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(dir) = self.path(parent) else {
            return reply.error(libc::ENOENT);
        };
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(flags & libc::O_TRUNC != 0)
            .mode(mode & 0o7777)
            .open(&path);
        let file = match file {
            Ok(file) => file,
            Err(e) => return reply.error(errno(&e)),
        };
        let attr = match self.entry(path) {
            Ok(attr) => attr,
            Err(e) => return reply.error(e),
        };
        let mut state = self.state.lock().unwrap();
        state.next_fh += 1;
        let fh = state.next_fh;
        state.handles.insert(fh, (attr.ino, file));
        reply.created(&TTL, &attr, 0, fh, 0)
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let state = self.state.lock().unwrap();
        let Some((_, file)) = state.handles.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let mut buffer = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read_at(&mut buffer[filled..], offset as u64 + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buffer[..filled])
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut state = self.state.lock().unwrap();
        if state.power_lost {
            return reply.error(libc::EIO);
        }
        let Some((ino, file)) = state.handles.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let (ino, file) = (*ino, file.try_clone());
        let Ok(file) = file else {
            return reply.error(libc::EIO);
        };
        let Some(path) = state.paths.get(&ino).cloned() else {
            return reply.error(libc::ENOENT);
        };
        Self::remember(
            &mut state,
            ino,
            &path,
            &file,
            offset as u64,
            data.len() as u64,
        );
        match file.write_all_at(data, offset as u64) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        reply.ok()
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state.lock().unwrap().handles.remove(&fh);
        reply.ok()
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state.lock().unwrap();
        if state.power_lost {
            return reply.error(libc::EIO);
        }
        // Durable from here: what a disk holds after this fsync survives the power.
        state.pending.remove(&ino);
        state.fsyncs += 1;
        reply.ok()
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn opendir(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0)
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.path(ino) else {
            return reply.error(libc::ENOENT);
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut all: Vec<(u64, FileType, std::ffi::OsString)> = vec![
            (ino, FileType::Directory, ".".into()),
            (ino, FileType::Directory, "..".into()),
        ];
        for entry in entries.flatten() {
            if let Ok(meta) = entry.metadata() {
                let kind = if meta.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                all.push((self.ino_of(&meta), kind, entry.file_name()));
            }
        }
        for (index, (ino, kind, name)) in all.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, index as i64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let Some(root) = self.path(fuser::FUSE_ROOT_ID) else {
            return reply.error(libc::ENOENT);
        };
        let path = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: a valid C string and writable memory of the right type.
        if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
            return reply.error(libc::EIO);
        }
        // SAFETY: statvfs returned 0, so it filled `stat`.
        let s = unsafe { stat.assume_init() };
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        )
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Needs root (or fusermount3); says so instead of failing elsewhere.
    fn mounted(backing: &Path, at: &Path) -> Option<Mounted> {
        match mount(backing, at) {
            Ok(m) => Some(m),
            Err(e) => {
                if std::env::var("MAILROOM_FAULT_TESTS").as_deref() == Ok("required") {
                    panic!("cannot mount the lazy filesystem: {e}");
                }
                eprintln!("SKIPPED: cannot mount FUSE here: {e}");
                None
            }
        }
    }

    #[test]
    fn unsynced_writes_are_lost_and_synced_ones_kept() {
        let backing = tempfile::tempdir().unwrap();
        let at = tempfile::tempdir().unwrap();
        let Some(fs) = mounted(backing.path(), at.path()) else {
            return;
        };
        let mut synced = File::create(at.path().join("synced")).unwrap();
        synced.write_all(b"durable").unwrap();
        synced.sync_all().unwrap();
        synced.write_all(b" and lost").unwrap();
        let mut overwritten = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(at.path().join("overwritten"))
            .unwrap();
        overwritten.write_all(b"AAAAAAAA").unwrap();
        overwritten.sync_data().unwrap();
        overwritten.write_all_at(b"BB", 2).unwrap();
        overwritten.set_len(4).unwrap();
        let mut never = File::create(at.path().join("never")).unwrap();
        never.write_all(b"gone").unwrap();
        // The server reads what it wrote, before the power goes.
        assert_eq!(
            std::fs::read(at.path().join("synced")).unwrap(),
            b"durable and lost"
        );
        drop((synced, overwritten, never));
        let report = fs.power_loss().unwrap();
        assert_eq!(report.files, 3, "{report:?}");
        assert_eq!(
            std::fs::read(backing.path().join("synced")).unwrap(),
            b"durable"
        );
        assert_eq!(
            std::fs::read(backing.path().join("overwritten")).unwrap(),
            b"AAAAAAAA"
        );
        assert_eq!(std::fs::read(backing.path().join("never")).unwrap(), b"");
    }
}
