//! Turning Debian's compressed `bzImage` into the uncompressed ELF `vmlinux` that QEMU boots
//! through the PVH entry point. Under TCG the kernel's own decompressor is emulated instruction by
//! instruction and costs about half a second of every boot; QEMU loading the ELF directly skips
//! it (and the real-mode setup code). Only payloads we can unpack (LZ4, what Debian uses) and
//! kernels that carry the PVH entry note qualify; anything else keeps the `bzImage`.

use object::elf::FileHeader64;
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point QEMU jumps to.
const PVH_ENTRY_NOTE: u32 = 18;
/// The legacy LZ4 frame the kernel build writes (`lz4 -l`): magic, then blocks of at most 8 MiB.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Why a `bzImage` stays compressed; shown as a detail line by the image build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unpack {
    #[error("not a bzImage with a boot protocol >= 2.08 header")]
    NotBzImage,
    #[error("its payload is {0}, which this builder does not unpack")]
    Compression(&'static str),
    #[error("its LZ4 payload is corrupt: {0}")]
    Corrupt(String),
    #[error("the unpacked kernel has no PVH entry note")]
    NoPvhNote,
}

/// The uncompressed ELF kernel inside `bzimage`, if it can be unpacked and boots via PVH.
pub fn vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, Unpack> {
    let payload = payload(bzimage)?;
    let elf = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(payload)?,
        [0x1f, 0x8b, ..] => return Err(Unpack::Compression("gzip")),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => return Err(Unpack::Compression("zstd")),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => return Err(Unpack::Compression("xz")),
        _ => return Err(Unpack::Compression("in an unknown format")),
    };
    if has_pvh_note(&elf) {
        Ok(elf)
    } else {
        Err(Unpack::NoPvhNote)
    }
}

/// The compressed payload, located by the x86 boot protocol header.
fn payload(img: &[u8]) -> Result<&[u8], Unpack> {
    let u16_at = |o: usize| img.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        img.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if img.get(0x202..0x206) != Some(b"HdrS") || u16_at(0x206).unwrap_or(0) < 0x208 {
        return Err(Unpack::NotBzImage);
    }
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let (Some(off), Some(len)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Err(Unpack::NotBzImage);
    };
    let start = (setup_sects + 1) * 512 + off as usize;
    img.get(start..start + len as usize)
        .ok_or(Unpack::NotBzImage)
}

/// Decode a legacy LZ4 frame. The kernel build appends the uncompressed size (4 bytes) after the
/// last block, so a length that runs past the end marks the end.
fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>, Unpack> {
    let mut out = Vec::with_capacity(data.len() * 4);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = 4;
    while let Some(b) = data.get(pos..pos + 4) {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        pos += 4;
        if len == LZ4_LEGACY_MAGIC {
            continue;
        }
        let Some(chunk) = data.get(pos..pos + len as usize) else {
            break;
        };
        let n = lz4_flex::block::decompress_into(chunk, &mut block)
            .map_err(|e| Unpack::Corrupt(e.to_string()))?;
        out.extend_from_slice(&block[..n]);
        pos += len as usize;
    }
    if out.is_empty() {
        return Err(Unpack::Corrupt("no blocks".into()));
    }
    Ok(out)
}

fn has_pvh_note(elf: &[u8]) -> bool {
    let check = || -> object::read::Result<bool> {
        let header = FileHeader64::<Endianness>::parse(elf)?;
        let endian = header.endian()?;
        for ph in header.program_headers(endian, elf)? {
            if let Some(mut notes) = ph.notes(endian, elf)? {
                while let Some(note) = notes.next()? {
                    if note.name() == b"Xen" && note.n_type(endian) == PVH_ENTRY_NOTE {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    };
    check().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_NOTE segment holding one note.
    fn elf_with_note(name: &[u8], n_type: u32) -> Vec<u8> {
        let mut note = Vec::new();
        note.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&n_type.to_le_bytes());
        note.extend_from_slice(name);
        note.push(0);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        note.extend_from_slice(&0x0100_0000u32.to_le_bytes());
        let phoff = 64u64;
        let noteoff = phoff + 56;
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[32..40].copy_from_slice(&phoff.to_le_bytes());
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        ph[8..16].copy_from_slice(&noteoff.to_le_bytes());
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[48..56].copy_from_slice(&4u64.to_le_bytes());
        e.extend_from_slice(&ph);
        e.extend_from_slice(&note);
        e
    }

    /// A bzImage-shaped buffer: boot header fields, then `payload` after the setup sectors.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0xaa; 16]);
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0xbb; 32]);
        img
    }

    /// What the kernel build does: `lz4 -l` in blocks, then the uncompressed size appended.
    fn lz4_legacy_frame(data: &[u8], block: usize) -> Vec<u8> {
        let mut f = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            f.extend_from_slice(&(c.len() as u32).to_le_bytes());
            f.extend_from_slice(&c);
        }
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        f
    }

    #[test]
    fn unpacks_lz4_pvh_kernel_across_blocks() {
        let mut elf = elf_with_note(b"Xen", PVH_ENTRY_NOTE);
        elf.extend((0..3 * LZ4_LEGACY_BLOCK / 2).map(|i| (i % 251) as u8));
        let img = bzimage(&lz4_legacy_frame(&elf, LZ4_LEGACY_BLOCK));
        assert_eq!(vmlinux(&img).unwrap(), elf);
    }

    #[test]
    fn kernels_without_pvh_or_in_other_formats_stay_compressed() {
        let elf = elf_with_note(b"Xen", 5);
        let img = bzimage(&lz4_legacy_frame(&elf, LZ4_LEGACY_BLOCK));
        assert_eq!(vmlinux(&img), Err(Unpack::NoPvhNote));
        let other_owner = elf_with_note(b"GNU", PVH_ENTRY_NOTE);
        let img = bzimage(&lz4_legacy_frame(&other_owner, LZ4_LEGACY_BLOCK));
        assert_eq!(vmlinux(&img), Err(Unpack::NoPvhNote));
        assert_eq!(
            vmlinux(&bzimage(&[0x1f, 0x8b, 8, 0])),
            Err(Unpack::Compression("gzip"))
        );
        assert_eq!(vmlinux(b"not a kernel"), Err(Unpack::NotBzImage));
        let mut corrupt = lz4_legacy_frame(&elf, LZ4_LEGACY_BLOCK);
        corrupt[8] = 0xff;
        corrupt[9] = 0xff;
        assert!(vmlinux(&bzimage(&corrupt)).is_err());
    }
}
