//! A defensive GGUF (v2, v3) reader.
//!
//! Layout: magic `GGUF`, version (u32), tensor count and metadata count (u64),
//! the metadata key/values, the tensor infos (name, dims with `ne[0]` first,
//! ggml type, offset from the data section), padding to `general.alignment`
//! (default 32), then the data section. Every read is bounds-checked, every
//! count is capped by the bytes left in the file before anything is
//! allocated, and tensor data ranges are checked against the file and against
//! each other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{ConvertError, IoContext};

pub const MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest string accepted (chat templates are the longest in practice).
const MAX_STRING_BYTES: u64 = 64 << 20;
/// Arrays nest at most this deep.
const MAX_ARRAY_DEPTH: u32 = 4;
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short human-readable rendering (arrays abbreviated).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => format!("{:?}… ({} bytes)", &s[..char_floor(s, 60)], s.len()),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) if a.len() > 4 => format!("[{} values]", a.len()),
            Value::Array(a) => format!("[{}]", a.iter().map(Value::summary).collect::<Vec<_>>().join(", ")),
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// The largest char boundary of `s` not above `at`.
fn char_floor(s: &str, at: usize) -> usize {
    (0..=at.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// The ggml tensor types this reader knows the block size of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    Bf16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            24 => GgmlType::I8,
            25 => GgmlType::I16,
            26 => GgmlType::I32,
            27 => GgmlType::I64,
            28 => GgmlType::F64,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q8_1 => (32, 36),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Q8K => (256, 292),
            GgmlType::I8 => (1, 1),
            GgmlType::I16 => (1, 2),
            GgmlType::I32 => (1, 4),
            GgmlType::I64 | GgmlType::F64 => (1, 8),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::I8 => "I8",
            GgmlType::I16 => "I16",
            GgmlType::I32 => "I32",
            GgmlType::I64 => "I64",
            GgmlType::F64 => "F64",
            GgmlType::Bf16 => "BF16",
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor info.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions with `ne[0]` (the fastest-varying, a matrix's input dimension) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub bytes: u64,
}

impl GgufTensor {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in PyTorch order (`ne` reversed: `[out, in]` for a matrix).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<GgufTensor>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
    map: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: u64,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn remaining(&self) -> u64 {
        self.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], ConvertError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.len());
        let Some(end) = end else {
            return Err(ConvertError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos,
                end: self.pos.saturating_add(n),
                len: self.len(),
            });
        };
        let bytes = &self.buf[self.pos as usize..end as usize];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], ConvertError> {
        let b = self.take(N as u64, what)?;
        Ok(b.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, ConvertError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, ConvertError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, ConvertError> {
        let len = self.u64(what)?;
        if len > MAX_STRING_BYTES {
            return Err(ConvertError::invalid(self.path, what(), format!("string of {len} bytes exceeds the limit")));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| ConvertError::invalid(self.path, what(), format!("string is not UTF-8: {e}")))
    }

    /// A count of items that each take at least `min_item_bytes`: never more than the file can hold.
    fn count(&mut self, min_item_bytes: u64, what: &dyn Fn() -> String) -> Result<u64, ConvertError> {
        let n = self.u64(what)?;
        let room = self.remaining() / min_item_bytes.max(1);
        if n > room {
            return Err(ConvertError::invalid(
                self.path,
                what(),
                format!("count {n} exceeds what the remaining {} bytes can hold", self.remaining()),
            ));
        }
        Ok(n)
    }

    fn value(&mut self, ty: u32, depth: u32, what: &dyn Fn() -> String) -> Result<Value, ConvertError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(ConvertError::invalid(self.path, what(), format!("bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(ConvertError::invalid(self.path, what(), "arrays nest too deeply"));
                }
                let item_ty = self.u32(what)?;
                let n = self.count(min_value_bytes(item_ty), what)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(ConvertError::invalid(self.path, what(), format!("unknown metadata value type {other}")))
            }
        })
    }
}

/// The fewest bytes one value of GGUF type `ty` occupies.
fn min_value_bytes(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12,
        _ => 1,
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ConvertError> {
        let file = std::fs::File::open(path).at(path)?;
        // SAFETY: read-only mapping; the converter never writes its input, and a
        // concurrent writer could at worst yield garbage values, which the
        // NaN/Inf and shape checks report.
        let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<Self, ConvertError> {
        let mut c = Cursor { buf: &map, pos: 0, path };
        let magic = c.array::<4>(&|| "magic".into())?;
        if magic != MAGIC {
            return Err(ConvertError::invalid(path, "magic", format!("{magic:02x?} is not `GGUF`")));
        }
        let version = c.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(ConvertError::Unsupported { path: path.into(), what: format!("GGUF version {version}") });
        }
        // tensor infos take at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes;
        // metadata entries at least 8 (key len) + 4 (type) + 1.
        let tensor_count = c.u64(&|| "tensor count".into())?;
        let kv_count = c.count(13, &|| "metadata count".into())?;
        if tensor_count > c.remaining() / 24 {
            return Err(ConvertError::invalid(
                path,
                "tensor count",
                format!("{tensor_count} tensors cannot fit the file"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = c.string(&|| format!("metadata key {i}"))?;
            let ty = c.u32(&|| format!("metadata `{key}` type"))?;
            let value = c.value(ty, 0, &|| format!("metadata `{key}`"))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(ConvertError::invalid(path, format!("metadata `{key}`"), "duplicate key"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(ConvertError::invalid(
                        path,
                        "general.alignment",
                        format!("{} is not a power of two", v.summary()),
                    ))
                }
            },
        };
        let mut infos = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = c.string(&|| format!("tensor info {i} name"))?;
            let what = |field: &str| format!("tensor `{name}` {field}");
            let n_dims = c.u32(&|| what("dimension count"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(ConvertError::invalid(
                    path,
                    what("dimension count"),
                    format!("{n_dims} is not in 1..={MAX_DIMS}"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&|| what("dimensions"))?);
            }
            let type_id = c.u32(&|| what("type"))?;
            let offset = c.u64(&|| what("offset"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| ConvertError::UnsupportedDtype {
                path: path.into(),
                tensor: name.clone(),
                dtype: format!("ggml type {type_id}"),
            })?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = c.pos.checked_next_multiple_of(alignment).unwrap_or(u64::MAX);
        let len = c.len();
        if data_start > len {
            return Err(ConvertError::HeaderTooLarge { path: path.into(), header: data_start, len });
        }
        let data_len = len - data_start;
        let mut tensors = Vec::with_capacity(infos.len());
        let mut seen = std::collections::BTreeSet::new();
        for (name, dims, ty, offset) in infos {
            if !seen.insert(name.clone()) {
                return Err(ConvertError::invalid(path, format!("tensor `{name}`"), "duplicate tensor name"));
            }
            let bytes = tensor_bytes(&dims, ty).ok_or_else(|| {
                ConvertError::invalid(
                    path,
                    format!("tensor `{name}` dimensions"),
                    format!("{dims:?} overflow or do not fill whole {ty} blocks"),
                )
            })?;
            let end = offset.checked_add(bytes);
            match end {
                Some(end) if end <= data_len => {}
                _ => {
                    return Err(ConvertError::OffsetOutOfRange {
                        path: path.into(),
                        tensor: name,
                        start: offset,
                        end: end.unwrap_or(u64::MAX),
                        len: data_len,
                    })
                }
            }
            if !offset.is_multiple_of(alignment) {
                return Err(ConvertError::invalid(
                    path,
                    format!("tensor `{name}` offset"),
                    format!("{offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            tensors.push(GgufTensor { name, dims, ty, offset: data_start + offset, bytes });
        }
        let mut by_offset: Vec<&GgufTensor> = tensors.iter().collect();
        by_offset.sort_by_key(|t| (t.offset, t.bytes));
        for pair in by_offset.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if b.offset < a.offset + a.bytes && b.bytes > 0 && a.bytes > 0 {
                return Err(ConvertError::OverlappingTensors {
                    path: path.into(),
                    tensor: b.name.clone(),
                    other: a.name.clone(),
                    start: b.offset - data_start,
                    end: b.offset - data_start + b.bytes,
                });
            }
        }
        Ok(GgufFile { path: path.into(), version, metadata, tensors, alignment, data_start, map })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (range checked when the file was opened).
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        &self.map[t.offset as usize..(t.offset + t.bytes) as usize]
    }

    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }
}

/// Bytes of a tensor of `dims` and type `ty`; `None` on overflow or a partial block.
fn tensor_bytes(dims: &[u64], ty: GgmlType) -> Option<u64> {
    let (block_len, block_bytes) = ty.block();
    let first = *dims.first()?;
    if !first.is_multiple_of(block_len) {
        return None;
    }
    let n = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
    (n / block_len).checked_mul(block_bytes)
}
