//! Checkpoints: a directory with `lowband.json` (the manifest) and safetensors files.
//!
//! ```text
//! DIR/lowband.json                     format, format_version, model config, optimizer step,
//!                                      and for each data file its name, byte length and CRC-32
//! DIR/model-<crc32>.safetensors        parameters, f32, names as in `layout`
//! DIR/optimizer-<crc32>.safetensors    optional: AdamW moments "m.<name>", "v.<name>"
//! ```
//! Data files are named by their checksum and written first (temp file, fsync, rename); the
//! manifest is renamed into place last. The checkpoint is the manifest: a crash at any moment
//! leaves either the old checkpoint or the new one, whole, and a loader verifies lengths and
//! checksums before believing a byte. Files no manifest names any more are removed afterwards.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::layout::{ParamLayout, TensorInfo};
use crate::model::check_finite;
use crate::optim::{AdamW, OptimizerConfig};

pub const FORMAT: &str = "lowband-checkpoint";
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "lowband.json";
/// A manifest larger than this is refused before it is read.
pub const MANIFEST_BYTES_MAX: u64 = 1 << 20;

/// Length and checksum of one data file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// The optimizer part of a manifest (its moments are in the optimizer file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerManifest {
    pub config: OptimizerConfig,
    pub step: u64,
    pub state: FileDigest,
}

/// `lowband.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub model: ModelConfig,
    pub params: FileDigest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerManifest>,
    /// Whatever the layer above wants saved with the model (round, data position, RNG state).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub config: ModelConfig,
    pub params: Vec<f32>,
    pub optimizer: Option<AdamW>,
    pub extra: serde_json::Value,
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, fsync, rename, fsync
/// of the directory. Readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    atomically(path, |tmp| {
        let mut file = File::create(tmp)?;
        file.write_all(bytes)?;
        sync(&file)
    })
}

/// fsync a file we wrote; a device or a pipe (written in place) has nothing to sync (fsync on
/// /dev/null fails with EINVAL).
fn sync(file: &File) -> std::io::Result<()> {
    if file.metadata()?.is_file() {
        file.sync_all()
    } else {
        Ok(())
    }
}

fn is_regular_or_absent(path: &Path) -> bool {
    fs::metadata(path).map_or(true, |meta| meta.is_file())
}

/// `write` fills a temp file next to `path` (and syncs it); then the rename and the directory's
/// fsync. On error the temp file is removed and `path` is untouched.
///
/// A `path` that names a symlink replaces the file it points to (the link stays); one that names a
/// device, a pipe or a socket (`--summary /dev/null`, `/dev/stdout`) is written in place, since a
/// rename would replace the device node itself (as root, /dev/null would become a regular file);
/// a directory is refused.
fn atomically<T>(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<T>) -> Result<T> {
    let resolved;
    let path = match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let error = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory");
            return Err(EngineError::io(path, error));
        }
        Ok(meta) if !meta.is_file() => return write(path).map_err(|e| EngineError::io(path, e)),
        Ok(_) => {
            resolved = fs::canonicalize(path).map_err(|e| EngineError::io(path, e))?;
            resolved.as_path()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path,
        Err(e) => return Err(EngineError::io(path, e)),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let value = write(&tmp)?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| EngineError::io(path, e))
}

/// A flat f32 tensor as safetensors writes it: its bytes borrowed (a little-endian machine
/// stores f32 as the format does), converted only on a big-endian one.
struct F32View<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            std::borrow::Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            std::borrow::Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        4 * self.data.len()
    }
}

/// Write named f32 tensors as a safetensors file at `path`, atomically (temp, fsync, rename,
/// fsync of the directory), streaming them from their buffers (no copy of the whole file in
/// memory: a coordinator's 12 GB checkpoint needs none). Returns the file's size and CRC-32 (read
/// back from the page cache).
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<(u64, u32)> {
    let views = tensors.iter().map(|(name, shape, data)| {
        (
            name.clone(),
            F32View {
                shape: shape.clone(),
                data,
            },
        )
    });
    atomically(path, |tmp| {
        if !is_regular_or_absent(tmp) {
            // A device or a pipe (written in place, see `atomically`): nothing to read back.
            let bytes = safetensors::serialize(views, None)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            File::create(tmp)?.write_all(&bytes)?;
            return Ok((bytes.len() as u64, crc32fast::hash(&bytes)));
        }
        safetensors::serialize_to_file(views, None, tmp)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut file = File::open(tmp)?;
        let (mut bytes, mut crc) = (0u64, crc32fast::Hasher::new());
        let mut buffer = vec![0u8; 1 << 22];
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            crc.update(&buffer[..read]);
            bytes += read as u64;
        }
        sync(&file)?;
        Ok((bytes, crc.finalize()))
    })
}

/// Serialize named f32 tensors to safetensors bytes (little-endian), with metadata.
pub fn tensors_to_safetensors(
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| EngineError::config("tensors", e.to_string()))?;
    safetensors::serialize(views, metadata)
        .map_err(|e| EngineError::config("tensors", e.to_string()))
}

fn digest(file: String, bytes: &[u8]) -> FileDigest {
    FileDigest {
        file,
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
    }
}

/// Save parameters (and optionally the optimizer) to `dir`, creating it if needed.
pub fn save(
    dir: &Path,
    config: &ModelConfig,
    params: &[f32],
    optimizer: Option<&AdamW>,
    extra: serde_json::Value,
) -> Result<()> {
    config.validate()?;
    let layout = ParamLayout::new(config);
    assert_eq!(
        params.len(),
        layout.total,
        "parameter buffer does not match its config"
    );
    fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let named: Vec<_> = layout
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), &params[t.range()]))
        .collect();
    let model_bytes = tensors_to_safetensors(&named, None)?;
    let params_digest = digest(
        format!("model-{:08x}.safetensors", crc32fast::hash(&model_bytes)),
        &model_bytes,
    );
    write_atomic(&dir.join(&params_digest.file), &model_bytes)?;
    let optimizer = match optimizer {
        None => None,
        Some(opt) => {
            let mut named = Vec::with_capacity(2 * layout.tensors.len());
            for t in &layout.tensors {
                named.push((format!("m.{}", t.name), t.shape.clone(), &opt.m[t.range()]));
                named.push((format!("v.{}", t.name), t.shape.clone(), &opt.v[t.range()]));
            }
            let bytes = tensors_to_safetensors(&named, None)?;
            let state = digest(
                format!("optimizer-{:08x}.safetensors", crc32fast::hash(&bytes)),
                &bytes,
            );
            write_atomic(&dir.join(&state.file), &bytes)?;
            Some(OptimizerManifest {
                config: opt.config,
                step: opt.step,
                state,
            })
        }
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        model: *config,
        params: params_digest,
        optimizer,
        extra,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| EngineError::config("manifest", e.to_string()))?;
    write_atomic(&dir.join(MANIFEST_FILE), &json)?;
    remove_unreferenced(dir, &manifest);
    Ok(())
}

/// Remove data files of earlier saves that the current manifest no longer names (best effort:
/// a leftover file wastes space but never changes what loads).
fn remove_unreferenced(dir: &Path, manifest: &Manifest) {
    let keep: Vec<&str> = std::iter::once(manifest.params.file.as_str())
        .chain(manifest.optimizer.as_ref().map(|o| o.state.file.as_str()))
        .collect();
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = (name.starts_with("model-") || name.starts_with("optimizer-"))
            && name.ends_with(".safetensors");
        if ours && !keep.contains(&name.as_str()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Read a whole file, refusing one larger than `limit` bytes. The size is checked before
/// reading and again while reading (a device or a pipe reports no size: `/dev/zero` must not be
/// read without end).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
    if len > limit {
        return Err(EngineError::checkpoint(
            path,
            format!("{len} bytes exceed the limit of {limit}"),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| EngineError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(EngineError::checkpoint(
            path,
            format!("more than the limit of {limit} bytes (not a regular file?)"),
        ));
    }
    Ok(bytes)
}

fn read_verified(dir: &Path, digest: &FileDigest, bytes_max: u64) -> Result<Vec<u8>> {
    if digest.file.contains('/') || digest.file.contains('\\') || digest.file.starts_with('.') {
        return Err(EngineError::checkpoint(
            dir,
            format!(
                "manifest names a file outside the checkpoint: {:?}",
                digest.file
            ),
        ));
    }
    let path = dir.join(&digest.file);
    if digest.bytes > bytes_max {
        return Err(EngineError::checkpoint(
            &path,
            format!("{} bytes exceed the limit of {bytes_max}", digest.bytes),
        ));
    }
    let bytes = read_limited(&path, bytes_max)?;
    if bytes.len() as u64 != digest.bytes {
        return Err(EngineError::checkpoint(
            &path,
            format!(
                "truncated or altered: {} bytes, manifest says {}",
                bytes.len(),
                digest.bytes
            ),
        ));
    }
    let crc = crc32fast::hash(&bytes);
    if crc != digest.crc32 {
        return Err(EngineError::checkpoint(
            &path,
            format!(
                "checksum {crc:08x} does not match the manifest's {:08x}",
                digest.crc32
            ),
        ));
    }
    Ok(bytes)
}

/// Parse safetensors bytes and return, for each tensor of `expected` (in order), its f32 values
/// named `prefix + name`. Every expected tensor must be there with its shape and dtype F32; any
/// other tensor is an error too.
pub fn tensors_from_safetensors(
    path: &Path,
    bytes: &[u8],
    expected: &[(String, Vec<usize>)],
) -> Result<Vec<Vec<f32>>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| EngineError::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let view = st
            .tensor(name)
            .map_err(|_| EngineError::checkpoint(path, format!("missing tensor {name:?}")))?;
        if view.dtype() != Dtype::F32 {
            return Err(EngineError::checkpoint(
                path,
                format!("tensor {name:?} has dtype {:?}, expected F32", view.dtype()),
            ));
        }
        if view.shape() != shape.as_slice() {
            return Err(EngineError::checkpoint(
                path,
                format!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    view.shape()
                ),
            ));
        }
        out.push(
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        );
    }
    if st.len() != expected.len() {
        let known: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| !known.contains(n))
            .collect();
        return Err(EngineError::checkpoint(
            path,
            format!("unexpected tensors: {}", extra.join(", ")),
        ));
    }
    Ok(out)
}

fn gather(layout: &ParamLayout, prefix: &str, path: &Path, bytes: &[u8]) -> Result<Vec<f32>> {
    let expected: Vec<_> = layout
        .tensors
        .iter()
        .map(|t| (format!("{prefix}{}", t.name), t.shape.clone()))
        .collect();
    let parts = tensors_from_safetensors(path, bytes, &expected)?;
    Ok(parts.concat())
}

/// Largest data file a checkpoint may have: parameters plus two moments, with safetensors headers.
fn data_bytes_max(config: &ModelConfig) -> u64 {
    config.parameter_count() as u64 * 4 * 2 + (1 << 20)
}

/// Load and verify a checkpoint directory.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.exists() {
        let hint = if dir.join("config.json").exists() {
            " (it looks like a Hugging Face export: use `lowband import hf`)"
        } else {
            ""
        };
        return Err(EngineError::checkpoint(
            dir,
            format!("no {MANIFEST_FILE}: not a lowband checkpoint{hint}"),
        ));
    }
    let manifest = read_manifest(&manifest_path)?;
    let config = manifest.model;
    config.validate()?;
    let layout = ParamLayout::new(&config);
    let bytes_max = data_bytes_max(&config);
    let model_bytes = read_verified(dir, &manifest.params, bytes_max)?;
    let params = gather(&layout, "", &dir.join(&manifest.params.file), &model_bytes)?;
    check_finite(&layout, &params)?;
    let optimizer = match &manifest.optimizer {
        None => None,
        Some(o) => {
            o.config.validate()?;
            let path = dir.join(&o.state.file);
            let bytes = read_verified(dir, &o.state, bytes_max)?;
            let (m, v) = split_moments(&layout, &path, &bytes)?;
            let mut adam = AdamW::new(o.config, layout.total);
            adam.m = m;
            adam.v = v;
            adam.step = o.step;
            Some(adam)
        }
    };
    Ok(Checkpoint {
        config,
        params,
        optimizer,
        extra: manifest.extra,
    })
}

fn read_manifest(path: &Path) -> Result<Manifest> {
    let bytes = read_limited(path, MANIFEST_BYTES_MAX)?;
    #[derive(Deserialize)]
    struct Header {
        format: Option<String>,
        format_version: Option<u32>,
    }
    let header: Header = serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::checkpoint(path, format!("not a lowband manifest: {e}")))?;
    if header.format.as_deref() != Some(FORMAT) {
        return Err(EngineError::checkpoint(
            path,
            format!("format is {:?}, expected {FORMAT:?}", header.format),
        ));
    }
    if header.format_version != Some(FORMAT_VERSION) {
        return Err(EngineError::checkpoint(
            path,
            format!(
                "format version {:?}; this build reads version {FORMAT_VERSION}",
                header.format_version
            ),
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::checkpoint(path, format!("bad manifest: {e}")))
}

fn split_moments(layout: &ParamLayout, path: &Path, bytes: &[u8]) -> Result<(Vec<f32>, Vec<f32>)> {
    let expected: Vec<_> = layout
        .tensors
        .iter()
        .flat_map(|t: &TensorInfo| {
            [
                (format!("m.{}", t.name), t.shape.clone()),
                (format!("v.{}", t.name), t.shape.clone()),
            ]
        })
        .collect();
    let parts = tensors_from_safetensors(path, bytes, &expected)?;
    let (mut m, mut v) = (
        Vec::with_capacity(layout.total),
        Vec::with_capacity(layout.total),
    );
    for pair in parts.chunks(2) {
        m.extend_from_slice(&pair[0]);
        v.extend_from_slice(&pair[1]);
    }
    for (name, values) in [("m", &m), ("v", &v)] {
        if let Some(index) = values
            .iter()
            .position(|x| !x.is_finite() || (name == "v" && *x < 0.0))
        {
            return Err(EngineError::NonFinite {
                tensor: format!("optimizer {name}"),
                index,
            });
        }
    }
    Ok((m, v))
}
