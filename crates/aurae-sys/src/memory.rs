//! The process's own memory: giving back the pages of its code and read-only data that it
//! touched while setting up and will not need again.
//!
//! A process started from a large binary (auraed's, re-executed as a VMM) keeps every page
//! of code it ever ran mapped, and each first touch maps 64 KiB around it (the kernel's
//! fault-around): the set-up code — configuration, jail, KVM set-up — stays resident for the
//! process's life. Those pages are clean file pages (the binary's page cache, shared with
//! every process mapped from the same file), so dropping this process's mappings of them
//! with `MADV_DONTNEED` loses nothing: a later touch maps the page again from the page
//! cache. Only segments that are never written qualify: `PT_LOAD` segments without `PF_W`,
//! outside `PT_GNU_RELRO` (written by the dynamic loader before it was made read-only), in
//! objects without text relocations; the vDSO is left alone.

use std::ffi::c_void;
use std::io;

/// A range of this process's address space: a never-written segment of a loaded object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    start: usize,
    len: usize,
}

const DT_NULL: i64 = 0;
const DT_TEXTREL: i64 = 22;
const DT_FLAGS: i64 = 30;
const DF_TEXTREL: u64 = 0x4;

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the running system; no memory is touched.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// What one walk over the loaded objects does with each never-written segment.
struct Walk {
    page: usize,
    vdso: usize,
    /// Give the segment's pages back (under the loader's lock, so no object is unloaded
    /// and its range reused between finding a segment and advising it).
    release: bool,
    out: Vec<Segment>,
    first_error: Option<io::Error>,
}

/// The never-written, whole-page ranges of one loaded object (none for the vDSO or an
/// object with text relocations). No arithmetic here can panic: this runs inside a C
/// callback.
fn segments_of(info: &libc::dl_phdr_info, page: usize, vdso: usize, out: &mut Vec<Segment>) {
    if info.dlpi_phdr.is_null() {
        return;
    }
    // SAFETY: the loader's program headers of this object: `dlpi_phnum` entries at
    // `dlpi_phdr`, mapped for as long as the object is loaded (all of this call).
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
    let base = info.dlpi_addr as usize;
    let at = |p: &libc::Elf64_Phdr| base.checked_add(usize::try_from(p.p_vaddr).ok()?);
    let span = |p: &libc::Elf64_Phdr, size: u64| {
        let lo = at(p)?;
        Some((lo, lo.checked_add(usize::try_from(size).ok()?)?))
    };
    let loads = || phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD);
    // The vDSO: the kernel's own mapping, not ours to drop.
    if loads().any(|p| span(p, p.p_memsz).is_some_and(|(lo, hi)| (lo..hi).contains(&vdso))) {
        return;
    }
    // An object with text relocations has written to its code: skip it whole.
    for p in phdrs.iter().filter(|p| p.p_type == libc::PT_DYNAMIC) {
        let Some(mut d) = at(p).map(|a| a as *const [i64; 2]) else {
            return;
        };
        loop {
            // SAFETY: the dynamic section of a loaded object is mapped and ends with a
            // DT_NULL entry; each entry is two 8-byte words (tag, value).
            let [tag, val] = unsafe { d.read_unaligned() };
            if tag == DT_NULL {
                break;
            }
            if tag == DT_TEXTREL || (tag == DT_FLAGS && (val as u64) & DF_TEXTREL != 0) {
                return;
            }
            d = d.wrapping_add(1);
        }
    }
    let relro: Vec<(usize, usize)> = phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_GNU_RELRO)
        .filter_map(|p| span(p, p.p_memsz))
        .collect();
    for p in loads().filter(|p| p.p_flags & libc::PF_W == 0) {
        // Up to the end of the file's bytes only: past it (`p_memsz > p_filesz`) the
        // loader zeroed the tail of a page, which is then a written copy.
        let Some((lo, hi)) = span(p, p.p_filesz) else {
            continue;
        };
        if relro.iter().any(|&(a, b)| a < hi && lo < b) {
            continue;
        }
        // Whole pages inside the segment only: a page it shares with a neighbour stays.
        let Some(start) = lo.checked_next_multiple_of(page) else {
            continue;
        };
        let end = hi - hi % page;
        if end > start {
            out.push(Segment {
                start,
                len: end - start,
            });
        }
    }
}

unsafe extern "C" fn each(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut Walk` passed to dl_iterate_phdr in `walk`, alive and not
    // otherwise borrowed for the whole iteration; `info` points to the loader's record of
    // one object, valid during this call.
    let (walk, info) = unsafe { (&mut *data.cast::<Walk>(), &*info) };
    let from = walk.out.len();
    segments_of(info, walk.page, walk.vdso, &mut walk.out);
    if walk.release {
        for s in &walk.out[from..] {
            // SAFETY: each range is whole pages of a never-written segment (file bytes
            // only) of an object that stays loaded while the loader's lock is held (all
            // of this callback): MADV_DONTNEED only unmaps clean file pages, which the
            // next access maps again with the same contents; no memory that Rust or the
            // loader wrote is affected.
            let r = unsafe { libc::madvise(s.start as *mut c_void, s.len, libc::MADV_DONTNEED) };
            if r != 0 && walk.first_error.is_none() {
                walk.first_error = Some(io::Error::last_os_error());
            }
        }
    }
    0
}

fn walk(release: bool) -> Walk {
    let mut walk = Walk {
        page: page_size(),
        // SAFETY: getauxval only reads the auxiliary vector the kernel gave the process.
        vdso: unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize,
        release,
        out: Vec::new(),
        first_error: None,
    };
    // SAFETY: `each` matches the callback type and cannot unwind (no arithmetic or call in
    // it panics: checked arithmetic, no indexing out of what it pushed); it uses `data`
    // only as the `Walk` given here, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut walk).cast::<c_void>()) };
    walk
}

/// The never-written segments of every object loaded in this process (the program, its
/// shared libraries), whole pages only: what [`release_read_only_segments`] gives back.
#[cfg(test)]
fn read_only_segments() -> Vec<Segment> {
    walk(false).out
}

/// Drops this process's mappings of the pages of its loaded objects' never-written
/// segments: they are mapped again from the page cache when next touched. Returns the
/// bytes advised, or the first error (every segment is still tried).
///
/// A debugger's breakpoints or a uprobe placed in this process's code before the call live
/// in private copies of code pages: they go with it.
pub fn release_read_only_segments() -> io::Result<usize> {
    let w = walk(true);
    match w.first_error {
        Some(e) => Err(e),
        None => Ok(w.out.iter().map(|s| s.len).sum()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_file_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    #[inline(never)]
    fn some_code(x: u64) -> u64 {
        (0..x).map(|i| i * i).sum()
    }

    fn hash(segments: &[Segment]) -> Vec<u64> {
        use std::hash::{DefaultHasher, Hasher};
        segments
            .iter()
            .map(|s| {
                // SAFETY: a mapped, readable segment of a loaded object (the test loads and
                // unloads none meanwhile).
                let bytes = unsafe { std::slice::from_raw_parts(s.start as *const u8, s.len) };
                let mut h = DefaultHasher::new();
                h.write(bytes);
                h.finish()
            })
            .collect()
    }

    #[test]
    fn released_pages_come_back_unchanged_and_cost_resident_memory_no_more() {
        let segments = read_only_segments();
        assert!(!segments.is_empty());
        let page = page_size();
        let here = some_code as *const () as usize;
        assert!(
            segments
                .iter()
                .any(|s| (s.start..s.start + s.len).contains(&here)),
            "this test's own code is in a read-only segment"
        );
        for s in &segments {
            assert_eq!((s.start % page, s.len % page), (0, 0), "{s:?}");
        }
        // Data that was written (a static changed at run time) is not in any segment.
        static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        WRITTEN.store(7, std::sync::atomic::Ordering::SeqCst);
        let w = &raw const WRITTEN as usize;
        assert!(
            !segments
                .iter()
                .any(|s| (s.start..s.start + s.len).contains(&w))
        );
        // Every byte of every segment reads the same after the release: no page given
        // back was a written copy (it would come back as the file's bytes).
        let before_hash = hash(&segments);
        let before = rss_file_kib();
        let bytes = release_read_only_segments().unwrap();
        let after = rss_file_kib();
        assert_eq!(hash(&segments), before_hash);
        assert_eq!(bytes, segments.iter().map(|s| s.len).sum::<usize>());
        assert!(after < before, "RssFile {before} → {after} KiB");
        // Code and the written static are as they were.
        assert_eq!(some_code(4), 14);
        assert_eq!(WRITTEN.load(std::sync::atomic::Ordering::SeqCst), 7);
        println!(
            "released {} KiB: RssFile {before} → {after} KiB",
            bytes >> 10
        );
    }
}
