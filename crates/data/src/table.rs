//! Parquet tables as the Hugging Face hub stores datasets: one file per shard, columns by name, an image column as
//! a struct of `bytes` and `path`, class labels as integers whose names are in the `huggingface` key of the file's
//! metadata (the dataset's features, written by `datasets`). Rows are read one at a time ([`Samples`]), so a shard
//! of several GB is never held in memory.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};

use crate::{DataError, Result, Sample, Skipped};

/// One parquet file, opened and checked.
pub struct Table {
    path: String,
    reader: SerializedFileReader<File>,
    columns: Vec<String>,
}

impl Table {
    /// Opens a parquet file; a file that is not parquet (or is truncated) is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| DataError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let reader = SerializedFileReader::new(file).map_err(|e| DataError::Read {
            path: shown.clone(),
            reason: format!("not a readable parquet file: {e}"),
        })?;
        let columns = reader
            .metadata()
            .file_metadata()
            .schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        Ok(Self {
            path: shown,
            reader,
            columns,
        })
    }

    /// The top-level column names, in file order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// An error naming the first of `names` that is not a column, and the columns there are.
    pub fn require(&self, names: &[&str]) -> Result<()> {
        match names.iter().find(|n| !self.columns.iter().any(|c| c == *n)) {
            None => Ok(()),
            Some(missing) => Err(DataError::MissingColumn {
                path: self.path.clone(),
                column: (*missing).to_string(),
                found: self.columns.join(", "),
            }),
        }
    }

    /// The class names of a `ClassLabel` column, from the dataset features that `datasets` stores under the
    /// `huggingface` metadata key; None when the file has no such metadata or the column is not a class label.
    pub fn class_names(&self, column: &str) -> Option<Vec<String>> {
        let metadata = self
            .reader
            .metadata()
            .file_metadata()
            .key_value_metadata()?;
        let json = metadata
            .iter()
            .find(|kv| kv.key == "huggingface")?
            .value
            .as_deref()?;
        let info: serde_json::Value = serde_json::from_str(json).ok()?;
        let feature = info.get("info")?.get("features")?.get(column)?;
        if feature.get("_type")?.as_str()? != "ClassLabel" {
            return None;
        }
        feature
            .get("names")?
            .as_array()?
            .iter()
            .map(|n| n.as_str().map(str::to_string))
            .collect()
    }

    /// Streams the rows through `map` into samples. `map` gets the 1-based row number and the row, and says why
    /// a row is unusable; with `skip_bad` such rows are counted in [`Samples::skipped`] and the stream goes on,
    /// without it the first is an error naming the file and row. A row the parquet decoder cannot read ends the
    /// stream with an error either way (what follows it in the file cannot be trusted).
    pub fn samples(
        self,
        skip_bad: bool,
        map: impl FnMut(usize, &Record) -> Result<Sample, String> + Send + 'static,
    ) -> Samples {
        Samples {
            path: self.path,
            rows: RowIter::from_file_into(Box::new(self.reader)),
            row: 0,
            map: Box::new(map),
            skip_bad,
            skipped: Skipped::default(),
            done: false,
        }
    }
}

/// One row, its columns by name.
pub struct Record(Row);

impl Record {
    fn field(&self, name: &str) -> Result<&Field, String> {
        self.0
            .get_column_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f)
            .ok_or_else(|| format!("no column `{name}`"))
    }

    /// A string column, trimmed; null or blank is an error ("empty `<name>`").
    pub fn text(&self, name: &str) -> Result<&str, String> {
        match self.field(name)? {
            Field::Str(s) if !s.trim().is_empty() => Ok(s.trim()),
            Field::Str(_) | Field::Null => Err(format!("empty `{name}`")),
            other => Err(format!("`{name}` is not text but {}", kind(other))),
        }
    }

    /// An integer column (any width); None when null.
    pub fn integer(&self, name: &str) -> Result<Option<i64>, String> {
        match self.field(name)? {
            Field::Null => Ok(None),
            Field::Byte(v) => Ok(Some(i64::from(*v))),
            Field::Short(v) => Ok(Some(i64::from(*v))),
            Field::Int(v) => Ok(Some(i64::from(*v))),
            Field::Long(v) => Ok(Some(*v)),
            Field::UByte(v) => Ok(Some(i64::from(*v))),
            Field::UShort(v) => Ok(Some(i64::from(*v))),
            Field::UInt(v) => Ok(Some(i64::from(*v))),
            other => Err(format!("`{name}` is not an integer but {}", kind(other))),
        }
    }

    /// A string or integer column as text: strings as they are, integers through `names` (class labels) when
    /// given, as digits otherwise; None when null.
    pub fn label(&self, name: &str, names: Option<&[String]>) -> Result<Option<String>, String> {
        if let Field::Str(s) = self.field(name)? {
            return Ok(Some(s.trim().to_string()));
        }
        let Some(v) = self.integer(name)? else {
            return Ok(None);
        };
        match names {
            None => Ok(Some(v.to_string())),
            Some(names) => usize::try_from(v)
                .ok()
                .and_then(|i| names.get(i))
                .map(|n| Some(n.clone()))
                .ok_or_else(|| {
                    format!(
                        "`{name}` {v} is not one of the {} class labels",
                        names.len()
                    )
                }),
        }
    }

    /// The encoded bytes of an image column: a `datasets` `Image` struct (`bytes`, `path`) or plain binary.
    /// Null, or a struct with only a `path` (an image outside the file), is an error.
    pub fn image(&self, name: &str) -> Result<&[u8], String> {
        match self.field(name)? {
            Field::Bytes(b) => Ok(b.data()),
            Field::Group(row) => {
                let part = |key: &str| row.get_column_iter().find(|(n, _)| *n == key);
                match part("bytes") {
                    Some((_, Field::Bytes(b))) if !b.data().is_empty() => Ok(b.data()),
                    _ => Err(match part("path") {
                        Some((_, Field::Str(p))) => {
                            format!("`{name}` has no bytes, only a path ({p})")
                        }
                        _ => format!("`{name}` has no bytes"),
                    }),
                }
            }
            Field::Null => Err(format!("`{name}` is null")),
            other => Err(format!("`{name}` is not an image but {}", kind(other))),
        }
    }
}

/// Turns a row into a sample, or says why it cannot.
type MapRow = Box<dyn FnMut(usize, &Record) -> Result<Sample, String> + Send>;

/// What a field holds, without its value (reasons never show a row's content: documents are private).
fn kind(field: &Field) -> &'static str {
    match field {
        Field::Null => "null",
        Field::Bool(_) => "a boolean",
        Field::Str(_) => "text",
        Field::Bytes(_) => "bytes",
        Field::Group(_) => "a struct",
        Field::ListInternal(_) => "a list",
        Field::MapInternal(_) => "a map",
        Field::Float(_) | Field::Double(_) | Field::Float16(_) | Field::Decimal(_) => {
            "a decimal number"
        }
        _ => "an integer or a date",
    }
}

/// Samples streamed from a [`Table`] (see [`Table::samples`]).
pub struct Samples {
    path: String,
    rows: RowIter<'static>,
    row: usize,
    map: MapRow,
    skip_bad: bool,
    skipped: Skipped,
    done: bool,
}

impl Samples {
    /// The rows skipped so far (with `skip_bad`), each with its reason.
    pub fn skipped(&self) -> &Skipped {
        &self.skipped
    }
}

impl Iterator for Samples {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let row = self.rows.next()?;
            self.row += 1;
            let bad = |reason: String| DataError::BadRow {
                path: self.path.clone(),
                row: self.row,
                reason,
            };
            let record = match row {
                Ok(row) => Record(row),
                Err(e) => {
                    self.done = true;
                    return Some(Err(bad(format!("cannot decode: {e}"))));
                }
            };
            match (self.map)(self.row, &record) {
                Ok(sample) => return Some(Ok(sample)),
                Err(reason) if self.skip_bad => {
                    tracing::debug!(path = %self.path, row = self.row, %reason, "row skipped");
                    self.skipped.rows.push((self.row, reason));
                }
                Err(reason) => {
                    self.done = true;
                    return Some(Err(bad(reason)));
                }
            }
        }
        None
    }
}

/// Opens one shard for [`Shards`] (`pathvqa::read`, `mtsamples::read_parquet`).
pub type Open = fn(&Path, bool) -> Result<Samples>;

/// The samples of several shards, one after the other, each opened when the previous one ends.
pub struct Shards {
    paths: std::collections::VecDeque<std::path::PathBuf>,
    open: Open,
    skip_bad: bool,
    current: Option<Samples>,
    skipped: Skipped,
    done: bool,
}

impl Shards {
    /// Streams `paths` in order through `open`; see [`Table::samples`] for `skip_bad`.
    pub fn new(paths: Vec<std::path::PathBuf>, open: Open, skip_bad: bool) -> Self {
        Self {
            paths: paths.into(),
            open,
            skip_bad,
            current: None,
            skipped: Skipped::default(),
            done: false,
        }
    }

    /// The rows skipped so far, each reason prefixed with its file.
    pub fn skipped(&self) -> Skipped {
        let mut all = self.skipped.clone();
        if let Some(current) = &self.current {
            all.rows.extend(
                current
                    .skipped
                    .rows
                    .iter()
                    .map(|(row, reason)| (*row, format!("{}: {reason}", current.path))),
            );
        }
        all
    }
}

impl Iterator for Shards {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            if let Some(current) = &mut self.current {
                match current.next() {
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    Some(ok) => return Some(ok),
                    None => {
                        self.skipped = self.skipped();
                        self.current = None;
                    }
                }
            }
            let path = self.paths.pop_front()?;
            match (self.open)(&path, self.skip_bad) {
                Ok(samples) => self.current = Some(samples),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// A shard's file name without its extension, the middle of its samples' ids.
pub fn shard_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// FNV-1a of bytes as 16 hex digits: a stable content id (the same image in two rows is one document).
pub fn content_id(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}
