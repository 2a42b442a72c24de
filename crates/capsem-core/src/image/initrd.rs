//! The initrd: an uncompressed cpio (newc) archive with capsem-agent as `/init`, the kernel
//! modules it loads under `/modules` plus `/modules/order` (their load order, one file name a
//! line), the mount points `/dev /proc /sys /mnt /tmp` and a `/dev/console` node (5,1) so the
//! kernel can open the initial console before devtmpfs is mounted. The archive is reproducible:
//! every entry has mtime 0 and owner root. Uses the `cpio` crate for the format; never decides
//! which modules go in (that is `kernel.rs`).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use cpio::newc::ModeFileType;
use cpio::NewcBuilder;

use super::error::io_err;
use super::kernel::ModuleFile;
use super::ImageError;

/// Directories created in the initrd (mode 0755) besides `/modules`.
pub const INITRD_DIRS: &[&str] = &["dev", "proc", "sys", "mnt", "tmp"];

/// The file in the initrd that lists the modules in load order.
pub const MODULE_ORDER_FILE: &str = "modules/order";

/// Writes the initrd to `out`: `agent` as `/init`, each of `modules` (relative to `modules_dir`)
/// as `/modules/<file name>`, in the given order.
pub(crate) fn write(
    out: &Path,
    agent: &Path,
    modules_dir: &Path,
    modules: &[ModuleFile],
) -> Result<(), ImageError> {
    let agent_bytes = fs::read(agent).map_err(|source| ImageError::Agent {
        path: agent.to_path_buf(),
        source,
    })?;
    let mut files = Vec::with_capacity(modules.len());
    for module in modules {
        let path = modules_dir.join(&module.rel_path);
        let mut bytes = fs::read(&path).map_err(io_err("read kernel module", &path))?;
        strip_signature(&mut bytes);
        files.push((module.file_name.as_str(), bytes));
    }
    for (path, size) in std::iter::once((agent, agent_bytes.len())).chain(
        modules
            .iter()
            .zip(&files)
            .map(|(m, (_, b))| (Path::new(&m.rel_path), b.len())),
    ) {
        if u32::try_from(size).is_err() {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                size: size as u64,
            });
        }
    }
    let file = File::create(out).map_err(io_err("create", out))?;
    let written = write_archive(BufWriter::new(file), &agent_bytes, &files)
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|file| file.sync_all());
    written.map_err(io_err("write", out))
}

/// The trailer the kernel's module signing appends to a signed `.ko`.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";

/// Drop a module's appended signature (if it has one), so the guest kernel skips verifying it
/// at load: an RSA check per module that costs milliseconds under TCG. The modules come from
/// Debian's kernel package (apt verified it), the guest kernel does not enforce signatures, and
/// guest root could load an unsigned module anyway, so nothing is given up.
///
/// Layout (`struct module_signature`, all before the magic): the signature, then 12 bytes:
/// algo, hash, id type, signer length, key id length (one byte each), 3 bytes of padding and
/// the signature length as a big-endian u32.
pub(crate) fn strip_signature(module: &mut Vec<u8>) -> bool {
    let Some(body) = module.strip_suffix(SIGNATURE_MAGIC) else {
        return false;
    };
    if body.len() < 12 {
        return false;
    }
    let info = &body[body.len() - 12..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let extra = info[3] as usize + info[4] as usize;
    let Some(keep) = body.len().checked_sub(12 + sig_len + extra) else {
        return false;
    };
    module.truncate(keep);
    true
}

/// The archive itself, to any writer. Sizes must fit in u32 (checked by [`write`]).
pub(crate) fn write_archive<W: Write>(
    out: W,
    agent: &[u8],
    modules: &[(&str, Vec<u8>)],
) -> io::Result<W> {
    let mut archive = Archive { out, ino: 0 };
    for dir in INITRD_DIRS {
        archive.dir(dir)?;
    }
    archive.char_dev("dev/console", 0o600, 5, 1)?;
    archive.file("init", 0o755, agent)?;
    archive.dir("modules")?;
    let mut order = String::new();
    for (name, bytes) in modules {
        archive.file(&format!("modules/{name}"), 0o644, bytes)?;
        order.push_str(name);
        order.push('\n');
    }
    archive.file(MODULE_ORDER_FILE, 0o644, order.as_bytes())?;
    cpio::newc::trailer(archive.out)
}

struct Archive<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Archive<W> {
    fn entry(&mut self, name: &str) -> NewcBuilder {
        self.ino += 1;
        NewcBuilder::new(name).ino(self.ino).uid(0).gid(0).mtime(0)
    }

    fn put(&mut self, builder: NewcBuilder, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry larger than 4 GiB"))?;
        let out = &mut self.out;
        let mut writer = builder.write(out, size);
        writer.write_all(data)?;
        writer.finish()?;
        Ok(())
    }

    fn dir(&mut self, name: &str) -> io::Result<()> {
        let entry = self
            .entry(name)
            .mode(0o755)
            .nlink(2)
            .set_mode_file_type(ModeFileType::Directory);
        self.put(entry, &[])
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let entry = self
            .entry(name)
            .mode(perm)
            .rdev_major(major)
            .rdev_minor(minor)
            .set_mode_file_type(ModeFileType::Char);
        self.put(entry, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let entry = self
            .entry(name)
            .mode(perm)
            .set_mode_file_type(ModeFileType::Regular);
        self.put(entry, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_signatures_are_stripped_and_unsigned_modules_kept() {
        let elf = b"\x7fELF module body".to_vec();
        let mut signed = elf.clone();
        signed.extend_from_slice(&[0xAB; 5]); // the signature
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        signed.extend_from_slice(SIGNATURE_MAGIC);
        assert!(strip_signature(&mut signed));
        assert_eq!(signed, elf);
        let mut plain = elf.clone();
        assert!(!strip_signature(&mut plain));
        assert_eq!(plain, elf);
        // A trailer claiming more than the file holds is left alone.
        let mut bad = elf.clone();
        bad.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        bad.extend_from_slice(SIGNATURE_MAGIC);
        let before = bad.clone();
        assert!(!strip_signature(&mut bad));
        assert_eq!(bad, before);
    }
    use std::io::Read;

    struct Read1 {
        name: String,
        mode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    fn read_all(archive: &[u8]) -> Vec<Read1> {
        let mut entries = Vec::new();
        let mut rest = archive;
        loop {
            let mut reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let (name, mode, rdev) = (
                e.name().to_string(),
                e.mode(),
                (e.rdev_major(), e.rdev_minor()),
            );
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            entries.push(Read1 {
                name,
                mode,
                rdev,
                data,
            });
            rest = reader.finish().unwrap();
        }
        entries
    }

    #[test]
    fn archive_round_trips_through_a_reader() {
        let modules = vec![
            ("virtio_ring.ko", b"ring".to_vec()),
            ("virtio.ko", b"virtio!".to_vec()),
        ];
        let bytes = write_archive(Vec::new(), b"\x7fELF agent", &modules).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = read_all(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "mnt",
                "tmp",
                "dev/console",
                "init",
                "modules",
                "modules/virtio_ring.ko",
                "modules/virtio.ko",
                "modules/order"
            ]
        );
        let get = |name: &str| entries.iter().find(|e| e.name == name).unwrap();
        assert_eq!(get("dev").mode, 0o040755);
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("init").data, b"\x7fELF agent");
        assert_eq!(get("dev/console").mode, 0o020600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("modules/virtio.ko").data, b"virtio!");
        assert_eq!(get("modules/virtio.ko").mode, 0o100644);
        assert_eq!(get("modules/order").data, b"virtio_ring.ko\nvirtio.ko\n");
    }

    #[test]
    fn archive_is_reproducible() {
        let modules = vec![("dummy.ko", vec![1, 2, 3])];
        let a = write_archive(Vec::new(), b"agent", &modules).unwrap();
        let b = write_archive(Vec::new(), b"agent", &modules).unwrap();
        assert_eq!(a, b);
    }

    /// GNU cpio (what a person would debug with) lists the archive the same way.
    #[test]
    fn gnu_cpio_lists_the_archive() {
        let Ok(status) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        assert!(status.status.success());
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"agent").unwrap();
        let mods = dir.path().join("lib");
        fs::create_dir_all(mods.join("kernel")).unwrap();
        fs::write(mods.join("kernel/dummy.ko"), b"dummy").unwrap();
        let out = dir.path().join("initrd.img");
        let modules = [ModuleFile {
            rel_path: "kernel/dummy.ko".into(),
            file_name: "dummy.ko".into(),
        }];
        write(&out, &agent, &mods, &modules).unwrap();
        let listing = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(File::open(&out).unwrap())
            .output()
            .unwrap();
        assert!(listing.status.success());
        assert_eq!(
            String::from_utf8_lossy(&listing.stdout),
            "dev\nproc\nsys\nmnt\ntmp\ndev/console\ninit\nmodules\nmodules/dummy.ko\nmodules/order\n"
        );
    }

    #[test]
    fn missing_agent_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(
            &dir.path().join("initrd.img"),
            &dir.path().join("no-agent"),
            dir.path(),
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("cargo build --release -p capsem-agent"),
            "{err}"
        );
    }
}
