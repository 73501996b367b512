//! SentencePiece BPE models (`.model` files, such as PaliGemma's `paligemma_tokenizer.model`
//! that openpi downloads) read and applied natively: the `ModelProto` protobuf is parsed by a
//! small reader of the fields encoding needs, and encoding follows the `sentencepiece` library
//! step by step (normalizer.cc, bpe_model.cc, sentencepiece_processor.cc), so that a text gets
//! the ids `SentencePieceProcessor.encode` gives it.
//!
//! Encoding: the text is normalised (user-defined symbols kept as they are; the
//! `precompiled_charsmap` rules, if any, applied longest match first; optionally a dummy
//! prefix, extra whitespace removed, spaces escaped as `▁`), split into characters (a
//! user-defined symbol is one frozen symbol), and the adjacent pair whose concatenation is the
//! highest-scoring piece is merged, leftmost first on ties, until no pair is a piece. `UNUSED`
//! pieces are split back into the halves they were merged from; an unknown symbol becomes its
//! UTF-8 bytes as `<0xXX>` pieces with byte fallback, else `<unk>` (a run of them one `<unk>`).

use std::collections::{BinaryHeap, HashMap};

/// A piece's type (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<Self> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }

    /// Pieces that BPE merges may produce (`is_normal_piece` in model_interface.cc).
    fn mergeable(self) -> bool {
        matches!(
            self,
            PieceType::Normal | PieceType::UserDefined | PieceType::Unused
        )
    }
}

#[derive(Debug, Clone)]
struct Piece {
    text: Vec<u8>,
    score: f32,
    kind: PieceType,
}

/// `NormalizerSpec`, with proto2's defaults for absent fields.
#[derive(Debug, Clone)]
pub struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// The `TrainerSpec` fields encoding depends on, with proto2's defaults.
#[derive(Debug, Clone)]
pub struct TrainerSpec {
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    pub byte_fallback: bool,
    pub treat_whitespace_as_suffix: bool,
    pub unk_id: i64,
    pub bos_id: i64,
    pub eos_id: i64,
    pub pad_id: i64,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
    pub pad_piece: String,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        TrainerSpec {
            model_type: 1,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
            pad_piece: "<pad>".into(),
        }
    }
}

/// A loaded SentencePiece BPE model.
pub struct SentencePiece {
    pieces: Vec<Piece>,
    /// NORMAL, USER_DEFINED and UNUSED pieces (what merges look up).
    mergeable: HashMap<Vec<u8>, u32>,
    /// UNKNOWN, CONTROL and BYTE pieces (looked up first by `PieceToId`).
    reserved: HashMap<Vec<u8>, u32>,
    user_defined: PrefixTrie,
    unk: u32,
    bos: u32,
    /// Id of `<0xXX>` for each byte, with byte fallback.
    byte_ids: Option<Box<[u32; 256]>>,
    normalizer: NormalizerSpec,
    charsmap: Option<CharsMap>,
    treat_whitespace_as_suffix: bool,
    trainer: TrainerSpec,
}

/// The most pieces a model may have: far above real vocabularies, and a bound on the memory
/// a malformed 64 MiB file can claim (a piece takes about 100 bytes here).
const MAX_PIECES: usize = 1 << 22;

/// The space symbol U+2581 (`▁`) that stands for ' ' once escaped.
const SPACE: &[u8] = "\u{2581}".as_bytes();

impl SentencePiece {
    /// Parses a serialized `ModelProto`. Errors name the field that was wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut trainer = TrainerSpec::default();
        let mut normalizer = NormalizerSpec::default();
        let mut self_test = Vec::new();
        let mut r = Reader::new(bytes, String::new());
        while let Some((field, value)) = r.next()? {
            match field {
                1 => {
                    if pieces.len() == MAX_PIECES {
                        return Err(format!(
                            "more than {MAX_PIECES} pieces (PaliGemma's model has 257152)"
                        ));
                    }
                    let at = format!("pieces[{}]", pieces.len());
                    pieces.push(parse_piece(value.bytes(&at)?, &at)?);
                }
                2 => parse_trainer(value.bytes("trainer_spec")?, &mut trainer)?,
                3 => parse_normalizer(value.bytes("normalizer_spec")?, &mut normalizer)?,
                4 => parse_self_test(value.bytes("self_test_data")?, &mut self_test)?,
                _ => {}
            }
        }
        let model = Self::new(pieces, trainer, normalizer)?;
        model.self_test(&self_test)?;
        Ok(model)
    }

    fn new(
        pieces: Vec<Piece>,
        trainer: TrainerSpec,
        normalizer: NormalizerSpec,
    ) -> Result<Self, String> {
        if trainer.model_type != 2 {
            let name = match trainer.model_type {
                1 => "UNIGRAM",
                3 => "WORD",
                4 => "CHAR",
                _ => "unknown",
            };
            return Err(format!(
                "trainer_spec.model_type is {} ({name}): only BPE models (type 2, as PaliGemma's) are supported",
                trainer.model_type
            ));
        }
        if pieces.is_empty() {
            return Err("the model has no pieces (field 1, `pieces`)".into());
        }
        let mut mergeable = HashMap::new();
        let mut reserved = HashMap::new();
        let mut user = Vec::new();
        let mut unk = None;
        let mut bytes = [u32::MAX; 256];
        for (i, p) in pieces.iter().enumerate() {
            let id = i as u32;
            let map = if p.kind.mergeable() {
                &mut mergeable
            } else {
                &mut reserved
            };
            if map.insert(p.text.clone(), id).is_some() {
                return Err(format!(
                    "pieces[{i}]: the piece {} is defined twice",
                    show(&p.text)
                ));
            }
            match p.kind {
                PieceType::UserDefined => user.push(p.text.as_slice()),
                PieceType::Unknown => {
                    if let Some(first) = unk {
                        return Err(format!(
                            "pieces[{i}]: a second UNKNOWN piece (the first is pieces[{first}])"
                        ));
                    }
                    unk = Some(id);
                }
                PieceType::Byte => {
                    if !trainer.byte_fallback {
                        return Err(format!(
                            "pieces[{i}]: byte piece {} although trainer_spec.byte_fallback is false",
                            show(&p.text)
                        ));
                    }
                    let b = piece_to_byte(&p.text).ok_or_else(|| {
                        format!(
                            "pieces[{i}]: BYTE piece {} is not of the form <0xXX>",
                            show(&p.text)
                        )
                    })?;
                    bytes[b as usize] = id;
                }
                _ => {}
            }
        }
        let unk = unk.ok_or("the model has no UNKNOWN piece (<unk>)")?;
        let byte_ids = if trainer.byte_fallback {
            if let Some(b) = bytes.iter().position(|&id| id == u32::MAX) {
                return Err(format!(
                    "trainer_spec.byte_fallback is true but there is no byte piece <0x{b:02X}> (256 are needed)"
                ));
            }
            Some(Box::new(bytes))
        } else {
            None
        };
        let charsmap = if normalizer.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(
                CharsMap::new(&normalizer.precompiled_charsmap).map_err(|e| {
                    format!(
                        "normalizer_spec.precompiled_charsmap (normalizer `{}`): {e}",
                        normalizer.name
                    )
                })?,
            )
        };
        let user_defined = PrefixTrie::new(&user);
        let mut model = SentencePiece {
            pieces,
            mergeable,
            reserved,
            user_defined,
            unk,
            bos: 0,
            byte_ids,
            treat_whitespace_as_suffix: trainer.treat_whitespace_as_suffix,
            normalizer,
            charsmap,
            trainer,
        };
        // `bos_id()`: the piece named trainer_spec.bos_piece, if it is a control piece.
        let bos_piece = model.trainer.bos_piece.clone();
        let bos = model.piece_to_id(bos_piece.as_bytes());
        if model.pieces[bos as usize].kind != PieceType::Control {
            return Err(format!(
                "the model has no control piece `{bos_piece}` (trainer_spec.bos_piece) to start a prompt with"
            ));
        }
        model.bos = bos;
        Ok(model)
    }

    /// SentencePiece checks a model against its `self_test_data` when it loads one; so do we.
    fn self_test(&self, samples: &[(String, String)]) -> Result<(), String> {
        for (input, expected) in samples {
            let found = self
                .encode_pieces(input)?
                .iter()
                .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            if &found != expected {
                return Err(format!(
                    "self_test_data: {input:?} encodes to {found:?}, the model expects {expected:?}"
                ));
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// `bos_id()`.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn unk_id(&self) -> u32 {
        self.unk
    }

    pub fn normalizer_spec(&self) -> &NormalizerSpec {
        &self.normalizer
    }

    pub fn trainer_spec(&self) -> &TrainerSpec {
        &self.trainer
    }

    /// The piece of `id`, as text (lossy for pieces that are not UTF-8).
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        self.pieces
            .get(id as usize)
            .map(|p| String::from_utf8_lossy(&p.text).into_owned())
    }

    /// `PieceToId`: reserved pieces first, then the others, else `<unk>`.
    pub fn piece_to_id(&self, piece: &[u8]) -> u32 {
        self.reserved
            .get(piece)
            .or_else(|| self.mergeable.get(piece))
            .copied()
            .unwrap_or(self.unk)
    }

    /// `SentencePieceProcessor.encode(text)`: ids, without `<bos>`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(self
            .encode_pieces(text)?
            .into_iter()
            .map(|(_, id)| id)
            .collect())
    }

    /// Pieces and ids, as `encode(text, out_type=str)` and `encode(text)` give them.
    pub fn encode_pieces(&self, text: &str) -> Result<Vec<(Vec<u8>, u32)>, String> {
        let normalized = self.normalize(text.as_bytes())?;
        let mut out: Vec<(Vec<u8>, u32)> = Vec::new();
        let mut prev_unk = false;
        for (piece, id) in self.bpe(&normalized) {
            let kind = self.pieces[id as usize].kind;
            let is_unk = kind == PieceType::Unknown;
            if kind == PieceType::Control {
                out.push((piece.to_vec(), id));
            } else if is_unk && self.byte_ids.is_some() {
                if let Some(bytes) = &self.byte_ids {
                    for &b in piece {
                        out.push((format!("<0x{b:02X}>").into_bytes(), bytes[b as usize]));
                    }
                }
            } else if is_unk && prev_unk {
                // A run of unknown pieces is one <unk> (its piece: their surfaces joined).
                if let Some(last) = out.last_mut() {
                    last.0.extend_from_slice(piece);
                }
            } else {
                out.push((piece.to_vec(), id));
            }
            prev_unk = is_unk;
        }
        Ok(out)
    }

    /// `Normalizer::Normalize` (normalizer.cc), without the alignment to the input.
    pub fn normalize(&self, mut input: &[u8]) -> Result<Vec<u8>, String> {
        let spec = &self.normalizer;
        let mut out = Vec::with_capacity(input.len() * 3);
        if input.is_empty() {
            return Ok(out);
        }
        if spec.remove_extra_whitespaces {
            while !input.is_empty() {
                let (sp, n) = self.normalize_prefix(input)?;
                if sp != b" " {
                    break;
                }
                input = &input[n..];
            }
        }
        if input.is_empty() {
            return Ok(out);
        }
        let space: &[u8] = if spec.escape_whitespaces { SPACE } else { b" " };
        if !self.treat_whitespace_as_suffix && spec.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        let mut prev_space = spec.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut sp, n) = self.normalize_prefix(input)?;
            while prev_space && sp.first() == Some(&b' ') {
                sp = &sp[1..];
            }
            if !sp.is_empty() {
                for &b in sp {
                    if spec.escape_whitespaces && b == b' ' {
                        out.extend_from_slice(SPACE);
                    } else {
                        out.push(b);
                    }
                }
                prev_space = sp.last() == Some(&b' ');
            }
            input = &input[n..];
            if !spec.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if spec.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        if self.treat_whitespace_as_suffix && spec.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        Ok(out)
    }

    /// `Normalizer::NormalizePrefix`: the normalised text of the start of `input` and the
    /// bytes of `input` it stands for.
    fn normalize_prefix<'a>(&'a self, input: &'a [u8]) -> Result<(&'a [u8], usize), String> {
        if let Some(n) = self.user_defined.longest_prefix(input) {
            return Ok((&input[..n], n));
        }
        if let Some(map) = &self.charsmap {
            if let Some((len, replacement)) = map.longest_match(input)? {
                return Ok((replacement, len));
            }
        }
        Ok(match utf8_char_len(input) {
            Some(n) => (&input[..n], n),
            // A malformed byte is replaced by U+FFFD (the input of `encode` is `&str`, so this
            // only guards the charsmap's output).
            None => ("\u{fffd}".as_bytes(), 1),
        })
    }

    /// `bpe::Model::Encode` (bpe_model.cc): the pieces of a normalised text and their ids.
    fn bpe<'a>(&self, text: &'a [u8]) -> Vec<(&'a [u8], u32)> {
        #[derive(Clone, Copy)]
        struct Symbol {
            prev: Option<usize>,
            next: Option<usize>,
            freeze: bool,
            start: usize,
            len: usize,
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            let (len, freeze) = match self.user_defined.longest_prefix(rest) {
                Some(n) => (n, true),
                None => (one_char_len(rest[0]).min(rest.len()), false),
            };
            let i = symbols.len();
            symbols.push(Symbol {
                prev: i.checked_sub(1),
                next: (pos + len < text.len()).then_some(i + 1),
                freeze,
                start: pos,
                len,
            });
            pos += len;
        }
        if symbols.is_empty() {
            return Vec::new();
        }
        let mut agenda = BinaryHeap::new();
        // Merged UNUSED pieces and the two symbols they were made of (the last recorded wins).
        let mut rev_merge: HashMap<&[u8], (&[u8], &[u8])> = HashMap::new();
        let piece_of = |s: &Symbol| &text[s.start..s.start + s.len];
        let mut add_pair = |symbols: &[Symbol],
                            agenda: &mut BinaryHeap<Pair>,
                            left: Option<usize>,
                            right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            let (ls, rs) = (symbols[l], symbols[r]);
            if ls.freeze || rs.freeze {
                return;
            }
            let merged = &text[ls.start..ls.start + ls.len + rs.len];
            let Some(&id) = self.mergeable.get(merged) else {
                return;
            };
            let piece = &self.pieces[id as usize];
            agenda.push(Pair {
                score: piece.score,
                left: l,
                right: r,
                size: merged.len(),
            });
            if piece.kind == PieceType::Unused {
                rev_merge.insert(merged, (piece_of(&ls), piece_of(&rs)));
            }
        };
        for i in 1..symbols.len() {
            add_pair(&symbols, &mut agenda, Some(i - 1), Some(i));
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (symbols[top.left], symbols[top.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != top.size {
                continue; // a pair that an earlier merge changed
            }
            symbols[top.left].len += r.len;
            symbols[top.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(top.left);
            }
            symbols[top.right].len = 0;
            let prev = symbols[top.left].prev;
            let next = symbols[top.left].next;
            add_pair(&symbols, &mut agenda, prev, Some(top.left));
            add_pair(&symbols, &mut agenda, Some(top.left), next);
        }
        let mut out = Vec::new();
        let mut index = Some(0);
        while let Some(i) = index {
            // Resegment UNUSED pieces into the halves they were merged from, depth first.
            let mut stack = vec![piece_of(&symbols[i])];
            while let Some(w) = stack.pop() {
                let id = self.piece_to_id(w);
                if self.pieces[id as usize].kind == PieceType::Unused {
                    if let Some(&(a, b)) = rev_merge.get(w) {
                        stack.push(b);
                        stack.push(a);
                        continue;
                    }
                }
                out.push((w, id));
            }
            index = symbols[i].next;
        }
        out
    }
}

/// A candidate merge: SentencePiece's agenda pops the highest score, then the leftmost.
#[derive(Debug, Clone, Copy)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Pair {}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pair {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Scores are checked finite at load.
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// `string_util::OneCharLen`: the length of a UTF-8 sequence from its first byte.
fn one_char_len(b: u8) -> usize {
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4][(b >> 4) as usize]
}

/// The length of the valid UTF-8 character at the start of `s` (`IsValidDecodeUTF8`).
fn utf8_char_len(s: &[u8]) -> Option<usize> {
    let n = one_char_len(s[0]);
    if s[0] >= 0x80 && n == 1 {
        return None;
    }
    let c = s.get(..n)?;
    std::str::from_utf8(c).ok().map(|_| n)
}

/// `<0xXX>` to its byte.
fn piece_to_byte(p: &[u8]) -> Option<u8> {
    let hex = p.strip_prefix(b"<0x")?.strip_suffix(b">")?;
    if hex.len() != 2
        || !hex
            .iter()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
    {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// A piece for messages: quoted, escaped, cut when long.
fn show(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    let s: String = s.chars().take(40).collect();
    format!("{s:?}")
}

/// The user-defined symbols, for the longest one starting a text (SentencePiece's
/// `PrefixMatcher`, a Darts trie of the symbols as C strings).
struct PrefixTrie {
    /// Per node: children sorted by byte, and whether a symbol ends here.
    nodes: Vec<(Vec<(u8, u32)>, bool)>,
}

impl PrefixTrie {
    fn new(words: &[&[u8]]) -> Self {
        let mut nodes: Vec<(Vec<(u8, u32)>, bool)> = vec![(Vec::new(), false)];
        for w in words {
            // Darts keys are C strings: a symbol ends at its first NUL.
            let w = w.split(|&b| b == 0).next().unwrap_or(&[]);
            if w.is_empty() {
                continue;
            }
            let mut node = 0usize;
            for &b in w {
                let children = &nodes[node].0;
                node = match children.binary_search_by_key(&b, |&(c, _)| c) {
                    Ok(i) => children[i].1 as usize,
                    Err(i) => {
                        let new = nodes.len();
                        nodes[node].0.insert(i, (b, new as u32));
                        nodes.push((Vec::new(), false));
                        new
                    }
                };
            }
            nodes[node].1 = true;
        }
        PrefixTrie { nodes }
    }

    /// Bytes of the longest symbol that `text` starts with.
    fn longest_prefix(&self, text: &[u8]) -> Option<usize> {
        let mut node = 0usize;
        let mut best = None;
        for (i, &b) in text.iter().enumerate() {
            let children = &self.nodes[node].0;
            match children.binary_search_by_key(&b, |&(c, _)| c) {
                Ok(k) => node = children[k].1 as usize,
                Err(_) => break,
            }
            if self.nodes[node].1 {
                best = Some(i + 1);
            }
        }
        best
    }
}

/// The longest replacement string a charsmap may hold (bytes).
const MAX_REPLACEMENT: usize = 256;

/// A `precompiled_charsmap`: a Darts-clone double array of the rules' source strings whose
/// values are offsets of NUL-terminated replacements in the string pool after it.
struct CharsMap {
    units: Vec<u32>,
    pool: Vec<u8>,
}

impl CharsMap {
    /// `DecodePrecompiledCharsMap`: `<trie bytes: u32 LE><trie><pool>`.
    fn new(blob: &[u8]) -> Result<Self, String> {
        if blob.len() <= 4 {
            return Err(format!("{} bytes: too short", blob.len()));
        }
        let trie_len = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        let rest = &blob[4..];
        if trie_len > rest.len() {
            return Err(format!(
                "the trie is said to have {trie_len} bytes, {} are left",
                rest.len()
            ));
        }
        if !trie_len.is_multiple_of(4) || trie_len == 0 {
            return Err(format!(
                "the trie has {trie_len} bytes, not a positive multiple of 4"
            ));
        }
        let units = rest[..trie_len]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let pool = rest[trie_len..].to_vec();
        if pool.last().is_some_and(|&b| b != 0) {
            return Err("the replacement strings do not end with NUL".into());
        }
        // A replacement stands for a character or a few: SentencePiece's rules replace with a
        // few dozen bytes at most. A longer one would let a prompt grow without bound.
        if let Some(long) = pool.split(|&b| b == 0).find(|r| r.len() > MAX_REPLACEMENT) {
            return Err(format!(
                "a replacement string of {} bytes, more than the {MAX_REPLACEMENT} allowed",
                long.len()
            ));
        }
        Ok(CharsMap { units, pool })
    }

    fn unit(&self, pos: usize) -> Result<u32, String> {
        self.units.get(pos).copied().ok_or_else(|| {
            format!(
                "precompiled_charsmap: trie position {pos} is outside its {} units",
                self.units.len()
            )
        })
    }

    /// Darts-clone's `commonPrefixSearch`, keeping the longest match: its length and the
    /// replacement.
    fn longest_match(&self, key: &[u8]) -> Result<Option<(usize, &[u8])>, String> {
        // Unit layout: bit 31 leaf; has_leaf bit 8; label = unit & (bit 31 | 0xff);
        // offset = (unit >> 10) << ((unit & (1 << 9)) >> 6); value = unit & 0x7fff_ffff.
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let mut best: Option<(usize, u32)> = None;
        let mut pos = offset(self.unit(0)?);
        for (i, &c) in key.iter().enumerate() {
            pos ^= c as usize;
            let unit = self.unit(pos)?;
            if unit & ((1 << 31) | 0xff) != c as u32 {
                break;
            }
            pos ^= offset(unit);
            if (unit >> 8) & 1 == 1 {
                let value = self.unit(pos)? & 0x7fff_ffff;
                if best.is_none_or(|(len, _)| i + 1 > len) {
                    best = Some((i + 1, value));
                }
            }
        }
        let Some((len, value)) = best else {
            return Ok(None);
        };
        let start = value as usize;
        let tail = self.pool.get(start..).ok_or_else(|| {
            format!(
                "precompiled_charsmap: replacement offset {start} is outside the {} bytes of strings",
                self.pool.len()
            )
        })?;
        // The pool ends with NUL (checked at load), so every replacement is terminated.
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        Ok(Some((len, &tail[..end])))
    }
}

// ---- The protobuf reader ------------------------------------------------------------------

/// A field's value by wire type.
enum Value<'a> {
    Varint(u64),
    /// Skipped: no field read here is 64-bit fixed.
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Value<'a> {
    fn wire(&self) -> &'static str {
        match self {
            Value::Varint(_) => "a varint",
            Value::Fixed64 => "a 64-bit value",
            Value::Bytes(_) => "a length-delimited value",
            Value::Fixed32(_) => "a 32-bit value",
        }
    }

    fn bytes(&self, at: &str) -> Result<&'a [u8], String> {
        match self {
            Value::Bytes(b) => Ok(b),
            other => Err(format!(
                "{at}: expected a length-delimited value, found {}",
                other.wire()
            )),
        }
    }

    fn string(&self, at: &str) -> Result<String, String> {
        String::from_utf8(self.bytes(at)?.to_vec()).map_err(|e| {
            format!(
                "{at}: not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            )
        })
    }

    fn varint(&self, at: &str) -> Result<u64, String> {
        match self {
            Value::Varint(v) => Ok(*v),
            other => Err(format!("{at}: expected a varint, found {}", other.wire())),
        }
    }

    fn boolean(&self, at: &str) -> Result<bool, String> {
        Ok(self.varint(at)? != 0)
    }

    /// An `int32` (negative values are sign-extended to 64 bits on the wire).
    fn int32(&self, at: &str) -> Result<i64, String> {
        let v = self.varint(at)? as i64;
        i32::try_from(v)
            .map(i64::from)
            .map_err(|_| format!("{at}: {v} does not fit in int32"))
    }

    fn float(&self, at: &str) -> Result<f32, String> {
        match self {
            Value::Fixed32(v) => Ok(f32::from_bits(*v)),
            other => Err(format!("{at}: expected a float, found {}", other.wire())),
        }
    }
}

/// Reads the fields of one message; `path` prefixes errors ("trainer_spec").
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: String,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], path: String) -> Self {
        Reader { buf, pos: 0, path }
    }

    fn err(&self, what: String) -> String {
        let at = if self.path.is_empty() {
            "the model".to_string()
        } else {
            self.path.clone()
        };
        format!("{at}: {what} at byte {}", self.pos)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(self.err("truncated varint".into()));
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(self.err("varint longer than 64 bits".into()));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes".into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(self.err(format!("truncated: {n} bytes declared, {left} left")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next field number and value, None at the end.
    fn next(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return Err(self.err("field number 0".into()));
        }
        let value = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| self.err(format!("length {n} too large")))?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
            }
            w => {
                return Err(self.err(format!(
                    "field {field} has wire type {w} (groups or an unknown type): not a SentencePiece model"
                )))
            }
        };
        Ok(Some((field, value)))
    }
}

fn parse_piece(buf: &[u8], at: &str) -> Result<Piece, String> {
    let mut r = Reader::new(buf, at.to_string());
    let (mut text, mut score, mut kind) = (None, 0.0f32, PieceType::Normal);
    while let Some((field, v)) = r.next()? {
        match field {
            1 => text = Some(v.bytes(&format!("{at}.piece"))?.to_vec()),
            2 => score = v.float(&format!("{at}.score"))?,
            3 => {
                let t = v.varint(&format!("{at}.type"))?;
                kind = PieceType::from_proto(t).ok_or_else(|| {
                    format!("{at}.type: unknown piece type {t} (expected 1 to 6)")
                })?;
            }
            _ => {}
        }
    }
    let text = text
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("{at}.piece: missing or empty (a piece must not be empty)"))?;
    if !score.is_finite() {
        return Err(format!("{at}.score: {score} is not a finite number"));
    }
    Ok(Piece { text, score, kind })
}

fn parse_trainer(buf: &[u8], t: &mut TrainerSpec) -> Result<(), String> {
    let mut r = Reader::new(buf, "trainer_spec".into());
    while let Some((field, v)) = r.next()? {
        let at = |name: &str| format!("trainer_spec.{name}");
        match field {
            3 => t.model_type = v.varint(&at("model_type"))?,
            24 => t.treat_whitespace_as_suffix = v.boolean(&at("treat_whitespace_as_suffix"))?,
            35 => t.byte_fallback = v.boolean(&at("byte_fallback"))?,
            40 => t.unk_id = v.int32(&at("unk_id"))?,
            41 => t.bos_id = v.int32(&at("bos_id"))?,
            42 => t.eos_id = v.int32(&at("eos_id"))?,
            43 => t.pad_id = v.int32(&at("pad_id"))?,
            // SentencePiece falls back to the default name when a piece name is empty.
            45 => t.unk_piece = nonempty(v.string(&at("unk_piece"))?, "<unk>"),
            46 => t.bos_piece = nonempty(v.string(&at("bos_piece"))?, "<s>"),
            47 => t.eos_piece = nonempty(v.string(&at("eos_piece"))?, "</s>"),
            48 => t.pad_piece = nonempty(v.string(&at("pad_piece"))?, "<pad>"),
            _ => {}
        }
    }
    Ok(())
}

fn nonempty(s: String, default: &str) -> String {
    if s.is_empty() {
        default.to_string()
    } else {
        s
    }
}

fn parse_normalizer(buf: &[u8], n: &mut NormalizerSpec) -> Result<(), String> {
    let mut r = Reader::new(buf, "normalizer_spec".into());
    while let Some((field, v)) = r.next()? {
        let at = |name: &str| format!("normalizer_spec.{name}");
        match field {
            1 => n.name = v.string(&at("name"))?,
            2 => n.precompiled_charsmap = v.bytes(&at("precompiled_charsmap"))?.to_vec(),
            3 => n.add_dummy_prefix = v.boolean(&at("add_dummy_prefix"))?,
            4 => n.remove_extra_whitespaces = v.boolean(&at("remove_extra_whitespaces"))?,
            5 => n.escape_whitespaces = v.boolean(&at("escape_whitespaces"))?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_self_test(buf: &[u8], samples: &mut Vec<(String, String)>) -> Result<(), String> {
    let mut r = Reader::new(buf, "self_test_data".into());
    while let Some((field, v)) = r.next()? {
        if field != 1 {
            continue;
        }
        let at = format!("self_test_data.samples[{}]", samples.len());
        let mut s = Reader::new(v.bytes(&at)?, at.clone());
        let (mut input, mut expected) = (String::new(), String::new());
        while let Some((f, v)) = s.next()? {
            match f {
                1 => input = v.string(&format!("{at}.input"))?,
                2 => expected = v.string(&format!("{at}.expected"))?,
                _ => {}
            }
        }
        samples.push((input, expected));
    }
    Ok(())
}

/// A serialized `ModelProto` for tests: pieces (text, score, type 1..6), trainer and
/// normalizer fields as (field number, varint) pairs plus the bos piece name.
#[cfg(test)]
pub(crate) fn encode_model(
    pieces: &[(&str, f32, u64)],
    trainer: &[(u64, u64)],
    trainer_strings: &[(u64, &str)],
    normalizer: &[(u64, u64)],
) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn field_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
    let mut out = Vec::new();
    for (text, score, kind) in pieces {
        let mut p = Vec::new();
        field_bytes(&mut p, 1, text.as_bytes());
        varint(&mut p, 2 << 3 | 5);
        p.extend_from_slice(&score.to_le_bytes());
        varint(&mut p, 3 << 3);
        varint(&mut p, *kind);
        field_bytes(&mut out, 1, &p);
    }
    let mut t = Vec::new();
    for (f, v) in trainer {
        varint(&mut t, f << 3);
        varint(&mut t, *v);
    }
    for (f, s) in trainer_strings {
        field_bytes(&mut t, *f, s.as_bytes());
    }
    field_bytes(&mut out, 2, &t);
    let mut n = Vec::new();
    field_bytes(&mut n, 1, b"identity");
    for (f, v) in normalizer {
        varint(&mut n, f << 3);
        varint(&mut n, *v);
    }
    field_bytes(&mut out, 3, &n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PaliGemma's layout in miniature: <pad> <eos> <bos> <unk>, a user-defined "\n", letters,
    /// a few merges, `▁`; BPE, identity, no dummy prefix, extra whitespace kept.
    fn tiny(byte_fallback: bool) -> Vec<u8> {
        let mut pieces: Vec<(String, f32, u64)> = vec![
            ("<pad>".into(), 0.0, 3),
            ("<eos>".into(), 0.0, 3),
            ("<bos>".into(), 0.0, 3),
            ("<unk>".into(), 0.0, 2),
            ("\n".into(), 0.0, 4),
        ];
        if byte_fallback {
            pieces.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
        }
        for (p, s) in [
            ("th", -1.0),
            ("▁t", -2.0),
            ("▁th", -3.0),
            ("he", -3.0),
            ("the", -4.0),
            ("▁the", -5.0),
            ("ab", -6.0),
            ("bc", -6.0),
            ("xy", -7.0),
        ] {
            pieces.push((p.into(), s, if p == "xy" { 5 } else { 1 }));
        }
        for c in ["▁", "t", "h", "e", "a", "b", "c", "x", "y"] {
            pieces.push((c.into(), -10.0, 1));
        }
        let refs: Vec<(&str, f32, u64)> = pieces
            .iter()
            .map(|(p, s, k)| (p.as_str(), *s, *k))
            .collect();
        encode_model(
            &refs,
            &[
                (3, 2),
                (35, byte_fallback as u64),
                (40, 3),
                (41, 2),
                (42, 1),
                (43, 0),
            ],
            &[(46, "<bos>"), (47, "<eos>")],
            &[(3, 0), (4, 0)],
        )
    }

    fn pieces(m: &SentencePiece, text: &str) -> Vec<String> {
        m.encode_pieces(text)
            .unwrap()
            .into_iter()
            .map(|(p, _)| String::from_utf8_lossy(&p).into_owned())
            .collect()
    }

    #[test]
    fn merges_by_score_leftmost_first() {
        let m = SentencePiece::from_bytes(&tiny(true)).unwrap();
        assert_eq!(m.bos_id(), 2);
        assert_eq!(pieces(&m, "the the"), ["the", "▁the"]);
        // "abc": ab and bc score the same: the left pair merges first.
        assert_eq!(pieces(&m, "abc"), ["ab", "c"]);
        // "xy" is UNUSED: merged, then split back.
        assert_eq!(pieces(&m, "xy"), ["x", "y"]);
        // A user-defined symbol is never merged into its neighbours; spaces stay (identity).
        assert_eq!(pieces(&m, " t\nthe  "), ["▁t", "\n", "the", "▁", "▁"]);
        // Unknown characters become their UTF-8 bytes.
        let ids = m.encode("é").unwrap();
        assert_eq!(
            ids,
            vec![m.piece_to_id(b"<0xC3>"), m.piece_to_id(b"<0xA9>")]
        );
        assert!(m.encode("").unwrap().is_empty());
    }

    #[test]
    fn unknown_runs_are_one_unk_without_byte_fallback() {
        let m = SentencePiece::from_bytes(&tiny(false)).unwrap();
        assert_eq!(
            m.encode("aéü€b").unwrap(),
            vec![m.piece_to_id(b"a"), 3, m.piece_to_id(b"b")]
        );
        assert_eq!(pieces(&m, "éü"), ["éü"]);
    }

    #[test]
    fn malformed_models_name_the_field() {
        let good = tiny(true);
        let err = |b: &[u8]| SentencePiece::from_bytes(b).err().unwrap();
        assert!(
            err(&good[..good.len() - 3]).contains("truncated"),
            "{}",
            err(&good[..good.len() - 3])
        );
        assert!(err(b"{\"version\": 1}").contains("wire type"));
        let unigram = encode_model(&[("<unk>", 0.0, 2)], &[(3, 1)], &[], &[]);
        assert!(err(&unigram).contains("trainer_spec.model_type is 1 (UNIGRAM)"));
        let no_unk = encode_model(&[("a", 0.0, 1)], &[(3, 2)], &[], &[]);
        assert!(err(&no_unk).contains("no UNKNOWN piece"));
        let no_bos = encode_model(&[("<unk>", 0.0, 2), ("a", 0.0, 1)], &[(3, 2)], &[], &[]);
        assert!(
            err(&no_bos).contains("no control piece `<s>`"),
            "{}",
            err(&no_bos)
        );
        let bad_type = encode_model(&[("<unk>", 0.0, 9)], &[(3, 2)], &[], &[]);
        assert!(err(&bad_type).contains("pieces[0].type: unknown piece type 9"));
        let nan = encode_model(&[("<unk>", f32::NAN, 2)], &[(3, 2)], &[], &[]);
        assert!(err(&nan).contains("pieces[0].score"));
        let dup = encode_model(
            &[("<unk>", 0.0, 2), ("a", 0.0, 1), ("a", 0.0, 1)],
            &[(3, 2)],
            &[],
            &[],
        );
        assert!(err(&dup).contains("pieces[2]: the piece \"a\" is defined twice"));
        let few_bytes = encode_model(
            &[("<unk>", 0.0, 2), ("<0x00>", 0.0, 6)],
            &[(3, 2), (35, 1)],
            &[],
            &[],
        );
        assert!(err(&few_bytes).contains("no byte piece <0x01>"));
        let bad_byte = encode_model(
            &[("<unk>", 0.0, 2), ("<0xZZ>", 0.0, 6)],
            &[(3, 2), (35, 1)],
            &[],
            &[],
        );
        assert!(err(&bad_byte).contains("not of the form <0xXX>"));
        let byte_without_fallback = encode_model(
            &[("<unk>", 0.0, 2), ("<0x00>", 0.0, 6)],
            &[(3, 2)],
            &[],
            &[],
        );
        assert!(err(&byte_without_fallback).contains("byte_fallback is false"));
        // A string field holding a varint.
        let mut wrong = encode_model(&[("<unk>", 0.0, 2)], &[(3, 2)], &[], &[]);
        wrong.extend_from_slice(&[0x12, 0x03, 0xe8, 0x02, 0x01]); // trainer_spec { 45: 1 }
        let e = err(&wrong);
        assert!(
            e.contains("trainer_spec.unk_piece: expected a length-delimited value, found a varint"),
            "{e}"
        );
    }

    #[test]
    fn charsmap_is_refused_when_broken() {
        let e = CharsMap::new(&[1, 0]).err().unwrap();
        assert!(e.contains("too short"), "{e}");
        let e = CharsMap::new(&[100, 0, 0, 0, 1, 2]).err().unwrap();
        assert!(e.contains("100 bytes"), "{e}");
        let e = CharsMap::new(&[4, 0, 0, 0, 0, 0, 0, 0, b'a'])
            .err()
            .unwrap();
        assert!(e.contains("NUL"), "{e}");
        // A trie whose root points outside: an error at encode time, never a panic.
        let m = CharsMap::new(&[4, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, b'a', 0]).unwrap();
        assert!(m.longest_match(b"abc").is_err());
    }
}
