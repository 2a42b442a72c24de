//! Kernel module loading from the initrd: `/modules/order` lists file names in load order
//! (dependencies first), each loaded from `/modules/<file>` directly by syscall — no insmod
//! process. `virtio_mmio` gets the `virtio_mmio.*` parameters of the kernel command line.
//!
//! Signed modules (Debian's are) are loaded with their signature cut off, through
//! `init_module` on the bytes: checking the signature costs about four times the rest of the
//! load under TCG, and the initrd is as trusted as the kernel itself. A kernel that insists on
//! signatures gets the file as it is, through `finit_module`; unsigned files always go that way.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::BootError;

/// The module file names listed in an order file, in order.
pub fn parse_order(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let base = l.rsplit('/').next().unwrap_or(l);
            if base.ends_with(".ko") {
                base.to_string()
            } else {
                format!("{base}.ko")
            }
        })
        .collect()
}

fn is_virtio_mmio(file: &str) -> bool {
    let stem = file.trim_end_matches(".ko");
    stem == "virtio_mmio" || stem == "virtio-mmio"
}

/// Load every module listed in `dir/order`. A missing order file means nothing to load.
pub fn load_all(dir: &Path, mmio_params: &str) -> Result<usize, BootError> {
    let order_path = dir.join("order");
    let text = match std::fs::read_to_string(&order_path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(BootError::Read {
                path: order_path,
                source,
            })
        }
    };
    let files = parse_order(&text);
    for file in &files {
        let params = if is_virtio_mmio(file) {
            mmio_params
        } else {
            ""
        };
        load(&dir.join(file), params).map_err(|source| BootError::Module {
            module: file.clone(),
            source,
        })?;
        crate::console::trace(|| format!("loaded {file} {params}"));
    }
    Ok(files.len())
}

const SIG_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: algo, hash, id_type, signer_len, key_id_len, pad[3], be32 sig_len.
const SIG_INFO_LEN: usize = 12;

/// The module image without its appended signature, or `None` when it carries none.
pub fn strip_signature(image: &[u8]) -> Option<&[u8]> {
    let body = image.strip_suffix(SIG_MAGIC)?;
    let info_at = body.len().checked_sub(SIG_INFO_LEN)?;
    let info = &body[info_at..];
    let sig_len = u32::from_be_bytes(info[8..12].try_into().ok()?) as usize;
    let extra = sig_len + info[3] as usize + info[4] as usize;
    Some(&body[..info_at.checked_sub(extra)?])
}

fn check(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

fn load(path: &Path, params: &str) -> io::Result<()> {
    let params = CString::new(params).map_err(|_| io::ErrorKind::InvalidInput)?;
    let image = std::fs::read(path)?;
    if let Some(unsigned) = strip_signature(&image) {
        // SAFETY: init_module reads `len` bytes of our buffer and a NUL-terminated string.
        let r = unsafe {
            libc::syscall(
                libc::SYS_init_module,
                unsigned.as_ptr(),
                unsigned.len() as libc::c_ulong,
                params.as_ptr(),
            )
        };
        match check(r) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EKEYREJECTED | libc::EPERM)) => {}
            other => return other,
        }
    }
    let f = std::fs::File::open(path)?;
    // SAFETY: finit_module with an open descriptor and a NUL-terminated parameter string.
    check(unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_file_forms() {
        let got =
            parse_order("virtio_ring.ko\n\n# c\nkernel/drivers/virtio/virtio.ko\nvirtio_mmio\n");
        assert_eq!(got, ["virtio_ring.ko", "virtio.ko", "virtio_mmio.ko"]);
        assert!(is_virtio_mmio(&got[2]));
        assert!(!is_virtio_mmio(&got[1]));
    }

    #[test]
    fn signature_is_cut_off() {
        let mut img = b"\x7fELF module body".to_vec();
        let body_len = img.len();
        img.extend_from_slice(&[0xaa; 300]); // PKCS#7 blob
        img.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        img.extend_from_slice(&300u32.to_be_bytes());
        img.extend_from_slice(SIG_MAGIC);
        assert_eq!(strip_signature(&img), Some(&img[..body_len]));
        assert_eq!(strip_signature(b"\x7fELF unsigned"), None);
        // A bogus length must not panic.
        let mut bad = vec![0u8; 8];
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        bad.extend_from_slice(SIG_MAGIC);
        assert_eq!(strip_signature(&bad), None);
    }
}
