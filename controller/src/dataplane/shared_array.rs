//! An array map made with `BPF_F_MMAPABLE`, mapped into the agent's memory:
//! read and written in place, without a system call per element.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::MapData;

use super::error::DatapathError;

/// `BPF_F_MMAPABLE`: the array can be mapped into userspace.
const BPF_F_MMAPABLE: u32 = 1 << 10;

pub struct SharedArray<T> {
    elements: NonNull<T>,
    len: u32,
    mapping_len: usize,
    /// Kept open: programs loaded later (the bench fixture) refer to the
    /// map by this descriptor.
    _map: MapData,
}

// SAFETY: the mapping is owned by the array and changed only through its
// owner's `&mut self` methods; nothing in it is tied to the thread that made it.
unsafe impl<T> Send for SharedArray<T> {}

impl<T> SharedArray<T> {
    /// Map `map` (the array named `name`, `len` elements of `T`). A map
    /// pinned by an older build with another layout is refused by name
    /// rather than misread.
    pub fn open(name: &'static str, map: MapData, len: u32) -> Result<Self, DatapathError> {
        let info = map.info().map_err(|source| DatapathError::Map { name, source })?;
        let size = size_of::<T>();
        if info.map_flags() & BPF_F_MMAPABLE == 0 || info.value_size() as usize != size || info.max_entries() != len {
            return Err(DatapathError::Layout {
                name,
                found: format!(
                    "flags {:#x}, {} elements of {} bytes",
                    info.map_flags(),
                    info.max_entries(),
                    info.value_size()
                ),
                wanted: format!("mmapable, {len} elements of {size} bytes"),
            });
        }
        let mapping_len = size * len as usize;
        // SAFETY: a shared read-write mapping of the whole array, which the
        // kernel allows for BPF_F_MMAPABLE arrays; the pointer is checked.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(DatapathError::Mmap { name, source: std::io::Error::last_os_error() });
        }
        let elements = NonNull::new(address.cast::<T>()).expect("mmap returned a non-null address");
        Ok(SharedArray { elements, len, mapping_len, _map: map })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    /// Element `index`, in the mapping. Panics past the end: indexes come
    /// from the same layout constants the programs use.
    pub fn element(&self, index: u32) -> *mut T {
        assert!(index < self.len, "element {index} of {}", self.len);
        // SAFETY: within the mapping.
        unsafe { self.elements.as_ptr().add(index as usize) }
    }
}

impl<T> Drop for SharedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.elements.as_ptr().cast(), self.mapping_len) };
    }
}
