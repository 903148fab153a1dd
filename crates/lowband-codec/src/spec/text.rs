//! A codec spec as text: `NAME[:KEY=VALUE,...]`, printed and parsed back.

use std::fmt;
use std::str::FromStr;

use super::*;

impl fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CodecSpec::Fp32 => write!(f, "fp32"),
            CodecSpec::Fp16 { chunk } => write!(f, "fp16:chunk={chunk}"),
            CodecSpec::Bf16 { chunk } => write!(f, "bf16:chunk={chunk}"),
            CodecSpec::Int {
                bits,
                chunk,
                range,
                rounding,
                seed,
            } => {
                let range = match range {
                    Range::MinMax => "minmax".to_string(),
                    Range::Std(k) => format!("std:{k}"),
                };
                let rounding = match rounding {
                    Rounding::Nearest => "nearest",
                    Rounding::Stochastic => "stochastic",
                };
                write!(f, "int{bits}:chunk={chunk},range={range},round={rounding}")?;
                if seed != 0 {
                    write!(f, ",seed={seed}")?;
                }
                Ok(())
            }
            CodecSpec::TopK { k, chunk, values } => {
                write!(f, "topk:k={k},chunk={chunk},values={}", values.name())
            }
            CodecSpec::DctTopK { k, chunk, values } => {
                write!(f, "dct:k={k},chunk={chunk},values={}", values.name())
            }
            CodecSpec::RandomK {
                k,
                chunk,
                values,
                seed,
            } => write!(
                f,
                "randomk:k={k},chunk={chunk},values={},seed={seed}",
                values.name()
            ),
        }
    }
}

impl FromStr for CodecSpec {
    type Err = CodecError;

    /// `NAME[:KEY=VALUE,...]`; NAME is fp32, fp16, bf16, int8, int4, int2, topk, randomk or dct.
    fn from_str(text: &str) -> Result<Self, CodecError> {
        let (name, options) = text.split_once(':').unwrap_or((text, ""));
        let mut options = Options::parse(text, options)?;
        let spec = match name {
            "fp32" => CodecSpec::Fp32,
            "fp16" | "bf16" => {
                let chunk = options.u32("chunk", DEFAULT_CHUNK as u64)?;
                if name == "fp16" {
                    CodecSpec::Fp16 { chunk }
                } else {
                    CodecSpec::Bf16 { chunk }
                }
            }
            "int8" | "int4" | "int2" => int_spec(name, &mut options)?,
            "topk" | "randomk" => {
                let k = options.u32("k", DEFAULT_SPARSE_K as u64)?;
                let chunk = options.u32("chunk", DEFAULT_CHUNK as u64)?;
                let values = options.values(ValueCoding::Q2)?;
                if name == "topk" {
                    CodecSpec::TopK { k, chunk, values }
                } else {
                    let seed = options.number("seed", 0)?;
                    CodecSpec::RandomK { k, chunk, values, seed }
                }
            }
            "dct" => CodecSpec::DctTopK {
                k: options.u32("k", DEFAULT_DCT_K as u64)?,
                chunk: options.u32("chunk", DEFAULT_DCT_CHUNK as u64)?,
                values: options.values(ValueCoding::Sign)?,
            },
            other => return Err(options.bad(format!("unknown codec `{other}`: expected fp32, fp16, bf16, int8, int4, int2, topk, randomk or dct"))),
        };
        options.all_used(name)?;
        spec.validate()?;
        Ok(spec)
    }
}

/// An int codec's options: chunk, range (minmax or std:K), round (nearest or stochastic), seed.
fn int_spec(name: &str, options: &mut Options) -> Result<CodecSpec, CodecError> {
    let bits = name[3..].parse().expect("digits");
    let chunk = options.u32("chunk", DEFAULT_CHUNK as u64)?;
    let range = match options.take("range") {
        None | Some("minmax") => Range::MinMax,
        Some(v) => match v.strip_prefix("std:").map(str::parse::<f32>) {
            Some(Ok(k)) => Range::Std(k),
            _ => return Err(options.bad(format!("range=`{v}`: expected minmax or std:K"))),
        },
    };
    let rounding = match options.take("round") {
        None | Some("nearest") => Rounding::Nearest,
        Some("stochastic") => Rounding::Stochastic,
        Some(v) => return Err(options.bad(format!("round=`{v}`: expected nearest or stochastic"))),
    };
    let seed = options.number("seed", 0)?;
    Ok(CodecSpec::Int {
        bits,
        chunk,
        range,
        rounding,
        seed,
    })
}

/// A spec's `KEY=VALUE` options; each may be taken once, and any left untaken is an error.
struct Options<'a> {
    text: &'a str,
    pairs: Vec<(&'a str, &'a str)>,
    used: Vec<bool>,
}

impl<'a> Options<'a> {
    fn parse(text: &'a str, options: &'a str) -> Result<Options<'a>, CodecError> {
        let mut pairs = Vec::new();
        for option in options.split(',').filter(|o| !o.is_empty()) {
            let (key, value) = option.split_once('=').ok_or_else(|| {
                CodecError::InvalidSpec(format!("`{text}`: `{option}` is not KEY=VALUE"))
            })?;
            pairs.push((key.trim(), value.trim()));
        }
        let used = vec![false; pairs.len()];
        Ok(Options { text, pairs, used })
    }

    fn bad(&self, reason: String) -> CodecError {
        CodecError::InvalidSpec(format!("`{}`: {reason}", self.text))
    }

    fn take(&mut self, key: &str) -> Option<&'a str> {
        let found = self.pairs.iter().position(|(k, _)| *k == key)?;
        self.used[found] = true;
        Some(self.pairs[found].1)
    }

    fn number(&mut self, key: &str, default: u64) -> Result<u64, CodecError> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| self.bad(format!("{key}=`{v}` is not a whole number"))),
        }
    }

    fn u32(&mut self, key: &str, default: u64) -> Result<u32, CodecError> {
        let value = self.number(key, default)?;
        u32::try_from(value).map_err(|_| self.bad(format!("{key} is too large")))
    }

    fn values(&mut self, default: ValueCoding) -> Result<ValueCoding, CodecError> {
        Ok(match self.take("values") {
            None => default,
            Some("f32") => ValueCoding::F32,
            Some("f16") => ValueCoding::F16,
            Some("q8") => ValueCoding::Q8,
            Some("q4") => ValueCoding::Q4,
            Some("q2") => ValueCoding::Q2,
            Some("sign") => ValueCoding::Sign,
            Some(other) => {
                return Err(self.bad(format!(
                    "values=`{other}`: expected f32, f16, q8, q4, q2 or sign"
                )))
            }
        })
    }

    fn all_used(&self, name: &str) -> Result<(), CodecError> {
        match self.used.iter().position(|u| !u) {
            Some(unused) => Err(self.bad(format!(
                "`{}` is not an option of {name}",
                self.pairs[unused].0
            ))),
            None => Ok(()),
        }
    }
}
