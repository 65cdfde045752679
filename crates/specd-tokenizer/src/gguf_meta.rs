//! A small, defensive reader for the metadata part of GGUF files (versions 2 and 3).
//!
//! It parses the header, every metadata key/value pair (all GGUF value types, including
//! arrays and nested arrays) and the tensor-info table, and computes where the tensor data
//! starts (honouring `general.alignment`, default 32). It never reads tensor data.
//!
//! Every length read from the file is checked against the bytes that remain in the file
//! before anything is allocated, so a corrupt or hostile file yields
//! [`TokenizerError::BadGguf`] rather than a panic or a huge allocation.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::TokenizerError;

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest number of dimensions a GGUF tensor may have (`GGML_MAX_DIMS`).
pub const MAX_TENSOR_DIMS: u32 = 4;
/// How deeply arrays may nest inside arrays before the file is rejected.
const MAX_ARRAY_DEPTH: usize = 8;
/// Most array elements (summed over all arrays, nested included) one file may hold.
/// Each element costs ~32 bytes in memory, so this caps metadata memory at ~256 MiB even
/// for a hostile file; real vocabularies (150k–260k tokens, merges and types) are far below.
pub const MAX_TOTAL_ARRAY_ELEMENTS: u64 = 8 << 20;

type Result<T> = std::result::Result<T, TokenizerError>;

fn bad(reason: impl Into<String>) -> TokenizerError {
    TokenizerError::BadGguf(reason.into())
}

/// The type tag of a GGUF metadata value, as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufValueType {
    /// Decodes the on-disk type id.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// The on-disk type id.
    pub fn id(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    /// The fewest bytes one value of this type can occupy in the file (used to bound
    /// array lengths before allocating).
    fn min_encoded_size(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            // u64 length (possibly zero bytes of text).
            Self::String => 8,
            // u32 element type + u64 count.
            Self::Array => 12,
        }
    }
}

/// One GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array: the declared element type and the elements (all of that type).
    Array(GgufValueType, Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF type of this value.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            Self::U8(_) => GgufValueType::U8,
            Self::I8(_) => GgufValueType::I8,
            Self::U16(_) => GgufValueType::U16,
            Self::I16(_) => GgufValueType::I16,
            Self::U32(_) => GgufValueType::U32,
            Self::I32(_) => GgufValueType::I32,
            Self::F32(_) => GgufValueType::F32,
            Self::Bool(_) => GgufValueType::Bool,
            Self::String(_) => GgufValueType::String,
            Self::Array(..) => GgufValueType::Array,
            Self::U64(_) => GgufValueType::U64,
            Self::I64(_) => GgufValueType::I64,
            Self::F64(_) => GgufValueType::F64,
        }
    }

    /// The value as a signed 128-bit integer, for any integer type (not bool or float).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits in a `u32`.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_i128().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits in an `i32`.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_i128().and_then(|v| i32::try_from(v).ok())
    }

    /// Any integer value that fits in a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// A float value (`F32`, or `F64` narrowed to `f32`).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            // Narrowing is the point of this accessor.
            Self::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an array value.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(_, items) => Some(items),
            _ => None,
        }
    }
}

impl fmt::Display for MetaValue {
    /// A short human-readable rendering; long arrays and strings are abbreviated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::U8(v) => write!(f, "{v}"),
            Self::I8(v) => write!(f, "{v}"),
            Self::U16(v) => write!(f, "{v}"),
            Self::I16(v) => write!(f, "{v}"),
            Self::U32(v) => write!(f, "{v}"),
            Self::I32(v) => write!(f, "{v}"),
            Self::F32(v) => write!(f, "{v}"),
            Self::Bool(v) => write!(f, "{v}"),
            Self::U64(v) => write!(f, "{v}"),
            Self::I64(v) => write!(f, "{v}"),
            Self::F64(v) => write!(f, "{v}"),
            Self::String(s) => {
                const MAX: usize = 80;
                if s.chars().count() > MAX {
                    let head: String = s.chars().take(MAX).collect();
                    write!(f, "{head:?}… ({} bytes)", s.len())
                } else {
                    write!(f, "{s:?}")
                }
            }
            Self::Array(ty, items) => {
                const MAX: usize = 5;
                write!(f, "[{ty:?}; {}] [", items.len())?;
                for (i, item) in items.iter().take(MAX).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                if items.len() > MAX {
                    write!(f, ", …")?;
                }
                write!(f, "]")
            }
        }
    }
}

/// One entry of the tensor-info table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions as stored in GGUF (innermost first, ggml order).
    pub dims: Vec<u64>,
    /// The ggml type id (0 = F32, 1 = F16, 2 = Q4_0, ...).
    pub ggml_type: u32,
    /// Offset of the tensor's data relative to [`GgufMeta::data_offset`].
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (product of the dims), or `None` on overflow.
    pub fn n_elements(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// Parsed GGUF metadata: header, key/values and tensor infos (no tensor data).
#[derive(Debug, Clone)]
pub struct GgufMeta {
    version: u32,
    kvs: Vec<(String, MetaValue)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// Counts bytes consumed so we know how much of the file remains without seeking.
struct Cursor<R> {
    inner: R,
    pos: u64,
    end: u64,
    /// Array elements still allowed (see [`MAX_TOTAL_ARRAY_ELEMENTS`]).
    elements_left: u64,
}

impl<R: Read> Cursor<R> {
    fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        if (buf.len() as u64) > self.remaining() {
            return Err(bad(format!(
                "truncated file while reading {what} at offset {}",
                self.pos
            )));
        }
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad(format!(
                    "truncated file while reading {what} at offset {}",
                    self.pos
                ))
            } else {
                TokenizerError::Io(e)
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.bytes::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each can still fit in the file.
    fn check_fits(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() => Ok(()),
            _ => Err(bad(format!(
                "{what}: length {count} at offset {} exceeds the {} bytes left in the file",
                self.pos,
                self.remaining()
            ))),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        self.check_fits(len, 1, what)?;
        let len = usize::try_from(len).map_err(|_| bad(format!("{what}: length too large")))?;
        let mut buf = vec![0u8; len];
        self.fill(&mut buf, what)?;
        String::from_utf8(buf).map_err(|e| bad(format!("{what}: invalid UTF-8 ({e})")))
    }

    fn value(&mut self, ty: GgufValueType, depth: usize, what: &str) -> Result<MetaValue> {
        Ok(match ty {
            GgufValueType::U8 => MetaValue::U8(self.u8(what)?),
            GgufValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.bytes(what)?)),
            GgufValueType::U16 => MetaValue::U16(self.u16(what)?),
            GgufValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.bytes(what)?)),
            GgufValueType::U32 => MetaValue::U32(self.u32(what)?),
            GgufValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.bytes(what)?)),
            GgufValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.bytes(what)?)),
            GgufValueType::Bool => MetaValue::Bool(self.u8(what)? != 0),
            GgufValueType::String => MetaValue::String(self.string(what)?),
            GgufValueType::U64 => MetaValue::U64(self.u64(what)?),
            GgufValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.bytes(what)?)),
            GgufValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.bytes(what)?)),
            GgufValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(bad(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem_id = self.u32(what)?;
                let elem = GgufValueType::from_id(elem_id)
                    .ok_or_else(|| bad(format!("{what}: unknown array element type {elem_id}")))?;
                let count = self.u64(what)?;
                self.check_fits(count, elem.min_encoded_size(), what)?;
                self.elements_left = self.elements_left.checked_sub(count).ok_or_else(|| {
                    bad(format!(
                        "{what}: more than {MAX_TOTAL_ARRAY_ELEMENTS} array elements in total"
                    ))
                })?;
                let count = usize::try_from(count)
                    .map_err(|_| bad(format!("{what}: array length too large")))?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem, depth + 1, what)?);
                }
                MetaValue::Array(elem, items)
            }
        })
    }
}

impl GgufMeta {
    /// Reads GGUF metadata from `reader`, starting at its current position.
    ///
    /// The reader is buffered internally; on success it is left somewhere after the
    /// tensor-info table (use [`GgufMeta::data_offset`] to find the tensor data).
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<GgufMeta> {
        let start = reader.stream_position()?;
        let end = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(start))?;
        let mut c = Cursor {
            inner: BufReader::with_capacity(1 << 16, reader),
            pos: start,
            end,
            elements_left: MAX_TOTAL_ARRAY_ELEMENTS,
        };

        let magic = c
            .bytes::<4>("magic")
            .map_err(|_| bad("not a GGUF file (too short)"))?;
        if magic != GGUF_MAGIC {
            return Err(bad(format!(
                "not a GGUF file (magic {:02x?}, expected \"GGUF\")",
                magic
            )));
        }
        let version = c.u32("version")?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(bad("big-endian GGUF files are not supported"));
        }
        if version != 2 && version != 3 {
            return Err(bad(format!(
                "unsupported GGUF version {version} (supported: 2, 3)"
            )));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each kv needs at least a key length (8) + type (4) + a 1-byte value;
        // each tensor info at least a name length (8) + n_dims (4) + type (4) + offset (8).
        c.check_fits(n_kv, 13, "metadata count")?;
        c.check_fits(n_tensors, 24, "tensor count")?;

        let mut kvs: Vec<(String, MetaValue)> = Vec::new();
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty_id = c.u32(&key)?;
            let ty = GgufValueType::from_id(ty_id)
                .ok_or_else(|| bad(format!("{key}: unknown value type {ty_id}")))?;
            let value = c.value(ty, 0, &key)?;
            if index.insert(key.clone(), kvs.len()).is_some() {
                return Err(bad(format!("duplicate metadata key {key:?}")));
            }
            kvs.push((key, value));
        }

        let alignment = match kvs.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(bad(format!(
                        "general.alignment must be a power of two, got {v}"
                    )))
                }
            },
        };

        let mut tensors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims > MAX_TENSOR_DIMS {
                return Err(bad(format!(
                    "tensor {name:?} has {n_dims} dims (max {MAX_TENSOR_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "tensor {name:?} offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(bad(format!("duplicate tensor name {name:?}")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let data_offset = c
            .pos
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| bad("data offset overflows"))?;
        if !tensors.is_empty() && data_offset > end {
            return Err(bad(format!(
                "tensor data would start at {data_offset}, past the end of the file ({end})"
            )));
        }

        Ok(GgufMeta {
            version,
            kvs,
            index,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// Opens `path` and reads its GGUF metadata.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufMeta> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| {
            TokenizerError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        })?;
        Self::read(&mut file)
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata key/values in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.kvs
    }

    /// All metadata keys in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.kvs.iter().map(|(k, _)| k.as_str())
    }

    /// The tensor-info table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Looks up a tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data-section alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.index.get(key).map(|&i| &self.kvs[i].1)
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// `key` as a `u32` (any integer type whose value fits).
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u32()
    }

    /// `key` as a `u64` (any integer type whose value fits).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// `key` as an `f32` (`F32` or `F64`).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// `key` as an array of strings (`None` if absent, not an array, or any element is
    /// not a string).
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get(key)?
            .as_array()?
            .iter()
            .map(|v| v.as_str())
            .collect()
    }

    /// `key` as an array of `i32` (any integer element type whose values fit).
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get(key)?
            .as_array()?
            .iter()
            .map(|v| v.as_i32())
            .collect()
    }

    /// `key` as an array of `u32` (any integer element type whose values fit).
    pub fn get_u32_array(&self, key: &str) -> Option<Vec<u32>> {
        self.get(key)?
            .as_array()?
            .iter()
            .map(|v| v.as_u32())
            .collect()
    }

    /// `general.architecture`, e.g. `"llama"` or `"qwen2"`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// `general.name`, if present.
    pub fn name(&self) -> Option<&str> {
        self.get_str("general.name")
    }

    /// Like [`GgufMeta::get`] but a missing key is a [`TokenizerError::MissingKey`].
    pub fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key)
            .ok_or_else(|| TokenizerError::MissingKey(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{write_gguf, GgufTensorSpec};
    use std::io::Cursor as IoCursor;

    fn sample_kvs() -> Vec<(String, MetaValue)> {
        vec![
            (
                "general.architecture".into(),
                MetaValue::String("llama".into()),
            ),
            ("a.u8".into(), MetaValue::U8(7)),
            ("a.i8".into(), MetaValue::I8(-7)),
            ("a.u16".into(), MetaValue::U16(700)),
            ("a.i16".into(), MetaValue::I16(-700)),
            ("a.u32".into(), MetaValue::U32(70_000)),
            ("a.i32".into(), MetaValue::I32(-70_000)),
            ("a.f32".into(), MetaValue::F32(1.5)),
            ("a.bool".into(), MetaValue::Bool(true)),
            ("a.u64".into(), MetaValue::U64(1 << 40)),
            ("a.i64".into(), MetaValue::I64(-(1 << 40))),
            ("a.f64".into(), MetaValue::F64(-2.25)),
            (
                "a.strs".into(),
                MetaValue::Array(
                    GgufValueType::String,
                    vec![
                        MetaValue::String("x".into()),
                        MetaValue::String("ÿ€".into()),
                    ],
                ),
            ),
            (
                "a.i32s".into(),
                MetaValue::Array(
                    GgufValueType::I32,
                    vec![MetaValue::I32(1), MetaValue::I32(-2)],
                ),
            ),
            (
                "a.nested".into(),
                MetaValue::Array(
                    GgufValueType::Array,
                    vec![
                        MetaValue::Array(GgufValueType::U8, vec![MetaValue::U8(1)]),
                        MetaValue::Array(GgufValueType::U8, vec![]),
                    ],
                ),
            ),
            (
                "a.empty".into(),
                MetaValue::Array(GgufValueType::F32, vec![]),
            ),
        ]
    }

    fn encode(version: u32, kvs: &[(String, MetaValue)], tensors: &[GgufTensorSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        write_gguf(&mut out, version, kvs, tensors).expect("write to vec");
        out
    }

    #[test]
    fn round_trips_every_value_type_v2_and_v3() {
        for version in [2, 3] {
            let kvs = sample_kvs();
            let bytes = encode(version, &kvs, &[]);
            let meta = GgufMeta::read(&mut IoCursor::new(&bytes)).expect("parse");
            assert_eq!(meta.version(), version);
            assert_eq!(meta.metadata(), &kvs[..]);
            assert_eq!(meta.architecture(), Some("llama"));
            assert_eq!(meta.get_u32("a.u8"), Some(7));
            assert_eq!(meta.get_u32("a.i8"), None);
            assert_eq!(meta.get_u32("a.u32"), Some(70_000));
            assert_eq!(meta.get_u64("a.u64"), Some(1 << 40));
            assert_eq!(meta.get_u32("a.u64"), None);
            assert_eq!(meta.get_f32("a.f32"), Some(1.5));
            assert_eq!(meta.get_f32("a.f64"), Some(-2.25));
            assert_eq!(meta.get_bool("a.bool"), Some(true));
            assert_eq!(meta.get_str_array("a.strs"), Some(vec!["x", "ÿ€"]));
            assert_eq!(meta.get_i32_array("a.i32s"), Some(vec![1, -2]));
            assert_eq!(meta.get_u32_array("a.i32s"), None);
            assert_eq!(meta.get_str("missing"), None);
            assert_eq!(meta.alignment(), DEFAULT_ALIGNMENT);
            assert_eq!(meta.data_offset() % 32, 0);
            assert!(meta.tensors().is_empty());
        }
    }

    #[test]
    fn reads_tensor_infos_and_alignment() {
        let mut kvs = sample_kvs();
        kvs.push(("general.alignment".into(), MetaValue::U32(64)));
        let tensors = vec![
            GgufTensorSpec {
                name: "a".into(),
                dims: vec![4, 2],
                ggml_type: 0,
                data: vec![0u8; 32],
            },
            GgufTensorSpec {
                name: "b".into(),
                dims: vec![3],
                ggml_type: 0,
                data: vec![1u8; 12],
            },
        ];
        let bytes = encode(3, &kvs, &tensors);
        let meta = GgufMeta::read(&mut IoCursor::new(&bytes)).expect("parse");
        assert_eq!(meta.alignment(), 64);
        assert_eq!(meta.data_offset() % 64, 0);
        assert_eq!(meta.tensors().len(), 2);
        let a = meta.tensor("a").expect("a");
        assert_eq!(a.dims, vec![4, 2]);
        assert_eq!(a.offset, 0);
        assert_eq!(a.n_elements(), Some(8));
        let b = meta.tensor("b").expect("b");
        assert_eq!(b.offset, 64);
        let start = (meta.data_offset() + b.offset) as usize;
        assert_eq!(&bytes[start..start + 12], &[1u8; 12]);
    }

    #[test]
    fn reads_from_nonzero_start_position() {
        let bytes = encode(3, &sample_kvs(), &[]);
        let mut padded = vec![0xAAu8; 5];
        padded.extend_from_slice(&bytes);
        let mut cur = IoCursor::new(&padded);
        cur.set_position(5);
        let meta = GgufMeta::read(&mut cur).expect("parse");
        assert_eq!(meta.get_str("general.architecture"), Some("llama"));
    }

    #[test]
    fn rejects_not_gguf() {
        for bytes in [
            &b""[..],
            b"GG",
            b"PK\x03\x04 not gguf at all",
            b"\0\0\0\0\0\0\0\0",
        ] {
            let err = GgufMeta::read(&mut IoCursor::new(bytes)).expect_err("must fail");
            assert!(matches!(err, TokenizerError::BadGguf(_)), "{err}");
            assert!(err.to_string().contains("not a GGUF"), "{err}");
        }
    }

    #[test]
    fn rejects_bad_versions() {
        let mut bytes = encode(3, &sample_kvs(), &[]);
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        let err = GgufMeta::read(&mut IoCursor::new(&bytes)).expect_err("v1");
        assert!(err.to_string().contains("version 1"), "{err}");
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        let err = GgufMeta::read(&mut IoCursor::new(&bytes)).expect_err("big endian");
        assert!(err.to_string().contains("big-endian"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let tensors = vec![GgufTensorSpec {
            name: "t".into(),
            dims: vec![2],
            ggml_type: 0,
            data: vec![0u8; 8],
        }];
        let bytes = encode(3, &sample_kvs(), &tensors);
        let full = GgufMeta::read(&mut IoCursor::new(&bytes)).expect("full parse");
        // Every cut before the data section must fail cleanly.
        for cut in 0..full.data_offset() as usize {
            let res = GgufMeta::read(&mut IoCursor::new(&bytes[..cut]));
            assert!(
                matches!(res, Err(TokenizerError::BadGguf(_))),
                "cut at {cut}: {res:?}"
            );
        }
    }

    #[test]
    fn absurd_lengths_are_rejected_without_allocating() {
        // Header claiming u64::MAX kvs.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = GgufMeta::read(&mut IoCursor::new(&bytes)).expect_err("huge kv count");
        assert!(err.to_string().contains("exceeds"), "{err}");

        // One kv whose key length is huge.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 16]);
        let err = GgufMeta::read(&mut IoCursor::new(&bytes)).expect_err("huge key");
        assert!(err.to_string().contains("exceeds"), "{err}");

        // An array claiming 2^40 u64 elements.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(b'k');
        bytes.extend_from_slice(&9u32.to_le_bytes());
        bytes.extend_from_slice(&10u32.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        let err = GgufMeta::read(&mut IoCursor::new(&bytes)).expect_err("huge array");
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[test]
    fn rejects_invalid_utf8_unknown_types_and_duplicates() {
        let kvs = vec![("k".to_string(), MetaValue::String("ab".into()))];
        let mut bytes = encode(3, &kvs, &[]);
        // Corrupt the string value's bytes ("ab" is the last 2 bytes before padding).
        let pos = bytes
            .windows(2)
            .rposition(|w| w == b"ab")
            .expect("find value");
        bytes[pos] = 0xFF;
        let err = GgufMeta::read(&mut IoCursor::new(&bytes)).expect_err("utf8");
        assert!(err.to_string().contains("UTF-8"), "{err}");

        let mut bytes = encode(3, &kvs, &[]);
        // The value type id sits right after the 8-byte length and 1-byte key "k".
        let ty_pos = 4 + 4 + 8 + 8 + 8 + 1;
        bytes[ty_pos..ty_pos + 4].copy_from_slice(&99u32.to_le_bytes());
        let err = GgufMeta::read(&mut IoCursor::new(&bytes)).expect_err("type");
        assert!(err.to_string().contains("unknown value type 99"), "{err}");

        let dup = vec![
            ("k".to_string(), MetaValue::U8(1)),
            ("k".to_string(), MetaValue::U8(2)),
        ];
        let err = GgufMeta::read(&mut IoCursor::new(&encode(3, &dup, &[]))).expect_err("dup");
        assert!(err.to_string().contains("duplicate"), "{err}");
    }

    #[test]
    fn rejects_bad_alignment_and_deep_nesting() {
        let kvs = vec![("general.alignment".to_string(), MetaValue::U32(24))];
        let err = GgufMeta::read(&mut IoCursor::new(&encode(3, &kvs, &[]))).expect_err("align");
        assert!(err.to_string().contains("power of two"), "{err}");

        let mut v = MetaValue::Array(GgufValueType::U8, vec![]);
        for _ in 0..MAX_ARRAY_DEPTH + 1 {
            v = MetaValue::Array(GgufValueType::Array, vec![v]);
        }
        let kvs = vec![("deep".to_string(), v)];
        let err = GgufMeta::read(&mut IoCursor::new(&encode(3, &kvs, &[]))).expect_err("deep");
        assert!(err.to_string().contains("nested"), "{err}");
    }

    #[test]
    fn display_abbreviates() {
        let v = MetaValue::Array(
            GgufValueType::U32,
            (0..100).map(MetaValue::U32).collect::<Vec<_>>(),
        );
        let s = v.to_string();
        assert!(s.starts_with("[U32; 100] [0, 1, 2, 3, 4, …]"), "{s}");
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut bytes = b"GGUF\x03\0\0\0".to_vec();
            bytes.extend_from_slice(&tail);
            let _ = GgufMeta::read(&mut IoCursor::new(&bytes));
        }

        #[test]
        fn random_corruption_never_panics(idx in 0usize..400, byte in proptest::num::u8::ANY) {
            let mut bytes = encode(3, &sample_kvs(), &[]);
            let i = idx % bytes.len();
            bytes[i] = byte;
            let _ = GgufMeta::read(&mut IoCursor::new(&bytes));
        }
    }
}
