//! A reader of raw BTF, the kernel's type information. It indexes where each type starts and
//! reads names, members and parameters only when asked: the agent needs a few dozen of the
//! kernel's hundred thousand types, and a full parse into owned structures costs tens of MiB
//! at start-up (the peak that would otherwise stay as the agent's high-water mark).
//!
//! Layout (the kernel's `include/uapi/linux/btf.h`): a header, then a section of type records
//! (a 12-byte `struct btf_type`, followed by data whose size depends on the kind and `vlen`),
//! then a section of NUL-terminated strings. Type ids count records from 1; 0 is `void`.
use std::ops::Range;

const MAGIC: u16 = 0xeb9f;
/// `struct btf_header` up to `str_len`.
const HEADER_LEN: usize = 24;
/// `struct btf_type`.
const TYPE_LEN: usize = 12;

/// The kinds of BTF type (`BTF_KIND_*`), in their numeric order from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_info(info: u32) -> Option<Kind> {
        const KINDS: [Kind; 20] = [
            Kind::Void,
            Kind::Int,
            Kind::Ptr,
            Kind::Array,
            Kind::Struct,
            Kind::Union,
            Kind::Enum,
            Kind::Fwd,
            Kind::Typedef,
            Kind::Volatile,
            Kind::Const,
            Kind::Restrict,
            Kind::Func,
            Kind::FuncProto,
            Kind::Var,
            Kind::Datasec,
            Kind::Float,
            Kind::DeclTag,
            Kind::TypeTag,
            Kind::Enum64,
        ];
        // Kind 0 is not a record's kind: only id 0 is void.
        let kind = usize::try_from((info >> 24) & 0x1f).ok()?;
        (kind != 0).then(|| KINDS.get(kind).copied()).flatten()
    }

    /// Bytes of kind-specific data after the record, for `vlen` entries.
    fn extra_len(self, vlen: usize) -> usize {
        match self {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::Datasec | Kind::Enum64 => 12 * vlen,
            Kind::Enum | Kind::FuncProto => 8 * vlen,
            _ => 0,
        }
    }

    /// The kinds whose third word is the id of another type rather than a size.
    fn refers(self) -> bool {
        matches!(
            self,
            Kind::Ptr
                | Kind::Typedef
                | Kind::Volatile
                | Kind::Const
                | Kind::Restrict
                | Kind::Func
                | Kind::Var
                | Kind::DeclTag
                | Kind::TypeTag
        )
    }
}

/// One BTF blob and where each of its types starts.
pub struct BtfTypes {
    data: Vec<u8>,
    strings: Range<usize>,
    /// The byte offset in `data` of type `id`'s record, at `id - 1`.
    starts: Vec<u32>,
}

/// A struct or union member.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    pub name: &'a str,
    pub type_id: u32,
    pub bit_offset: u32,
    /// The width of a bitfield, for structs that say so (`kind_flag`).
    pub bitfield_size: Option<u32>,
}

/// One type of a [`BtfTypes`].
#[derive(Clone, Copy)]
pub struct Type<'a> {
    btf: &'a BtfTypes,
    id: u32,
    kind: Kind,
    /// Offset of its kind-specific data in `btf.data` (after the record).
    extra: usize,
    name_off: u32,
    info: u32,
    /// `size` or `type`, by kind.
    third: u32,
}

impl std::fmt::Debug for BtfTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BtfTypes({} types, {} bytes)",
            self.starts.len(),
            self.data.len()
        )
    }
}

impl BtfTypes {
    /// Indexes `data`, checking that every record lies within the type section. Only
    /// little-endian BTF is read (that of the hosts this agent runs on).
    pub fn parse(data: Vec<u8>) -> Result<BtfTypes, String> {
        let word = |at: usize| read_u32(&data, at).ok_or("the header is cut short");
        let magic = data
            .get(..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or("the header is cut short")?;
        if magic != MAGIC {
            return Err(format!(
                "bad magic {magic:#06x} (not BTF, or BTF of the other byte order)"
            ));
        }
        let header_len = to_usize(word(4)?)?;
        if header_len < HEADER_LEN {
            return Err(format!("a {header_len}-byte header is too short"));
        }
        let section = |off: u32, len: u32| -> Result<Range<usize>, String> {
            let start = header_len
                .checked_add(to_usize(off)?)
                .ok_or("a section offset overflows")?;
            let end = start
                .checked_add(to_usize(len)?)
                .ok_or("a section length overflows")?;
            if end > data.len() {
                return Err(format!(
                    "a section ends at byte {end}, past the end of the {}-byte file",
                    data.len()
                ));
            }
            Ok(start..end)
        };
        let types = section(word(8)?, word(12)?)?;
        let strings = section(word(16)?, word(20)?)?;
        let mut starts = Vec::new();
        let mut at = types.start;
        while at < types.end {
            if at + TYPE_LEN > types.end {
                return Err(format!("a type record at byte {at} is cut short"));
            }
            let info = read_u32(&data, at + 4).ok_or("a type record is cut short")?;
            let kind = Kind::from_info(info)
                .ok_or_else(|| format!("unknown type kind {} at byte {at}", (info >> 24) & 0x1f))?;
            let vlen = usize::try_from(info & 0xffff).map_err(|e| e.to_string())?;
            starts.push(u32::try_from(at).map_err(|_| "the file is larger than 4 GiB")?);
            at += TYPE_LEN + kind.extra_len(vlen);
        }
        if at != types.end {
            return Err("the last type record runs past the type section".to_owned());
        }
        starts.shrink_to_fit();
        Ok(BtfTypes {
            data,
            strings,
            starts,
        })
    }

    /// Type `id`; 0 is `void`. `None` past the last type.
    pub fn get(&self, id: u32) -> Option<Type<'_>> {
        if id == 0 {
            return Some(Type {
                btf: self,
                id,
                kind: Kind::Void,
                extra: 0,
                name_off: 0,
                info: 0,
                third: 0,
            });
        }
        let at = usize::try_from(*self.starts.get(usize::try_from(id - 1).ok()?)?).ok()?;
        let info = read_u32(&self.data, at + 4)?;
        Some(Type {
            btf: self,
            id,
            kind: Kind::from_info(info)?,
            extra: at + TYPE_LEN,
            name_off: read_u32(&self.data, at)?,
            info,
            third: read_u32(&self.data, at + 8)?,
        })
    }

    /// Every type called `name`, in id order (a scan: start-up asks for a few dozen names).
    pub fn named<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = Type<'a>> + use<'a, 'n> {
        (1..=u32::try_from(self.starts.len()).unwrap_or(u32::MAX))
            .filter_map(|id| self.get(id))
            .filter(move |ty| ty.name_off != 0 && ty.name() == name)
    }

    /// The string at `offset` in the string section; empty when there is none.
    fn string(&self, offset: u32) -> &str {
        let Some(start) = usize::try_from(offset)
            .ok()
            .and_then(|off| self.strings.start.checked_add(off))
            .filter(|&start| start < self.strings.end)
        else {
            return "";
        };
        let bytes = &self.data[start..self.strings.end];
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    }
}

impl<'a> Type<'a> {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Its name; empty for anonymous types.
    pub fn name(&self) -> &'a str {
        self.btf.string(self.name_off)
    }

    fn vlen(&self) -> usize {
        usize::try_from(self.info & 0xffff).unwrap_or(0)
    }

    /// The type a pointer, typedef, qualifier, function or variable refers to.
    pub fn referenced(&self) -> Option<Type<'a>> {
        self.kind
            .refers()
            .then(|| self.btf.get(self.third))
            .flatten()
    }

    /// The `n`-th 32-bit word of its kind-specific data.
    fn word(&self, n: usize) -> u32 {
        read_u32(&self.btf.data, self.extra + 4 * n).unwrap_or(0)
    }

    /// A struct's or union's members (none for other kinds).
    pub fn members(&self) -> impl Iterator<Item = Member<'a>> + 'a {
        let this = *self;
        let count = if matches!(self.kind, Kind::Struct | Kind::Union) {
            self.vlen()
        } else {
            0
        };
        let kind_flag = self.info >> 31 == 1;
        (0..count).map(move |i| {
            let offset = this.word(3 * i + 2);
            Member {
                name: this.btf.string(this.word(3 * i)),
                type_id: this.word(3 * i + 1),
                bit_offset: if kind_flag {
                    offset & 0xff_ffff
                } else {
                    offset
                },
                bitfield_size: kind_flag.then_some(offset >> 24),
            }
        })
    }

    /// A function prototype's parameters, as their type ids (none for other kinds).
    pub fn parameters(&self) -> impl Iterator<Item = u32> + 'a {
        let this = *self;
        let count = if self.kind == Kind::FuncProto {
            self.vlen()
        } else {
            0
        };
        (0..count).map(move |i| this.word(2 * i + 1))
    }

    /// An enum's enumerators with their values (none for other kinds).
    pub fn enumerators(&self) -> impl Iterator<Item = (&'a str, i64)> + 'a {
        let this = *self;
        let (count, stride) = match self.kind {
            Kind::Enum => (self.vlen(), 2),
            Kind::Enum64 => (self.vlen(), 3),
            _ => (0, 2),
        };
        (0..count).map(move |i| {
            let name = this.btf.string(this.word(stride * i));
            let low = this.word(stride * i + 1);
            let value = if stride == 3 {
                // Enum64: the low and high words; signedness is the kind flag's, and the
                // values asked for here are small.
                i64::from(low) | (i64::from(this.word(stride * i + 2)) << 32)
            } else {
                i64::from(low as i32)
            };
            (name, value)
        })
    }
}

/// A little-endian BTF blob of `types` (the 32-bit words of the type records, in id order) and
/// `strings` (starting with the empty string), laid out as the kernel's: the reverse of
/// [`BtfTypes::parse`]. `None` when a section would pass 4 GiB.
pub fn blob(types: &[u32], strings: &[u8]) -> Option<Vec<u8>> {
    let type_len = u32::try_from(types.len().checked_mul(4)?).ok()?;
    let str_len = u32::try_from(strings.len()).ok()?;
    let header_len = u32::try_from(HEADER_LEN).ok()?;
    let mut data = Vec::with_capacity(HEADER_LEN + 4 * types.len() + strings.len());
    data.extend(MAGIC.to_le_bytes());
    data.extend([1, 0]); // version, flags
    // Header length, then the type and string sections' offsets and lengths.
    for word in [header_len, 0, type_len, type_len, str_len] {
        data.extend(word.to_le_bytes());
    }
    for word in types {
        data.extend(word.to_le_bytes());
    }
    data.extend(strings);
    Some(data)
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn to_usize(value: u32) -> Result<usize, String> {
    usize::try_from(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        (kind << 24) | vlen | if kind_flag { 1 << 31 } else { 0 }
    }

    /// 1: int "int" (4 bytes); 2: struct "pair" { int a; int b:3 (bitfield at bit 32) };
    /// 3: pointer to 2; 4: typedef "pair_p" of 3; 5: enum "colour" { RED = 1, BLUE = -2 };
    /// 6: func proto (void *, int) returning void.
    fn sample() -> BtfTypes {
        let strings = b"\0int\0pair\0a\0b\0pair_p\0colour\0RED\0BLUE\0";
        let s = |name: &str| {
            let at = strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .unwrap();
            u32::try_from(at + 1).unwrap()
        };
        let types = [
            s("int"),
            info(1, 0, false),
            4,
            0x0100_0020, // signed, 32 bits
            s("pair"),
            info(4, 2, true),
            8,
            s("a"),
            1,
            0,
            s("b"),
            1,
            (3 << 24) | 32,
            0,
            info(2, 0, false),
            2,
            s("pair_p"),
            info(8, 0, false),
            3,
            s("colour"),
            info(6, 2, false),
            4,
            s("RED"),
            1,
            s("BLUE"),
            (-2_i32) as u32,
            0,
            info(13, 2, false),
            0,
            0,
            3,
            0,
            1,
        ];
        BtfTypes::parse(blob(&types, strings).unwrap()).unwrap()
    }

    #[test]
    fn reads_names_members_parameters_and_enumerators() {
        let btf = sample();
        let pair = btf.named("pair").next().unwrap();
        assert_eq!((pair.id(), pair.kind()), (2, Kind::Struct));
        let members: Vec<_> = pair
            .members()
            .map(|m| (m.name, m.type_id, m.bit_offset, m.bitfield_size))
            .collect();
        assert_eq!(members, [("a", 1, 0, Some(0)), ("b", 1, 32, Some(3))]);
        let typedef = btf.named("pair_p").next().unwrap();
        let pointer = typedef.referenced().unwrap();
        assert_eq!(pointer.kind(), Kind::Ptr);
        assert_eq!(pointer.referenced().unwrap().name(), "pair");
        let colour = btf.named("colour").next().unwrap();
        assert_eq!(
            colour.enumerators().collect::<Vec<_>>(),
            [("RED", 1), ("BLUE", -2)]
        );
        let proto = btf.get(6).unwrap();
        assert_eq!(proto.kind(), Kind::FuncProto);
        assert_eq!(proto.parameters().collect::<Vec<_>>(), [3, 1]);
        assert_eq!(btf.get(0).unwrap().kind(), Kind::Void);
        assert!(btf.get(7).is_none());
        assert_eq!(btf.named("nothing").count(), 0);
    }

    #[test]
    fn corrupt_blobs_are_errors_not_panics() {
        let good = blob(&[0, info(2, 0, false), 0], b"\0").unwrap();
        assert!(BtfTypes::parse(good.clone()).is_ok());
        for cut in 0..good.len() {
            let _ = BtfTypes::parse(good[..cut].to_vec());
        }
        let mut swapped = good.clone();
        swapped.swap(0, 1);
        assert!(BtfTypes::parse(swapped).unwrap_err().contains("magic"));
        // A struct claiming more members than the section holds.
        let short = blob(&[0, info(4, 9, false), 8], b"\0").unwrap();
        assert!(BtfTypes::parse(short).is_err());
        let unknown = blob(&[0, info(31, 0, false), 0], b"\0").unwrap();
        assert!(BtfTypes::parse(unknown).unwrap_err().contains("kind"));
        // A name offset past the strings reads as no name.
        let btf = BtfTypes::parse(blob(&[999, info(2, 0, false), 0], b"\0").unwrap()).unwrap();
        assert_eq!(btf.get(1).unwrap().name(), "");
    }
}
