//! medvl-nf4 against bitsandbytes 0.50.2's CPU backend (`fixtures/nf4.py`): random weights (f32 and bf16), a
//! tail block, an all-zero block, exact code values and exact midpoints, tiny and large values, blocksizes 32 to
//! 4096, and enough blocks for several nested blocks.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::path::Path;

use medvl_nf4::bnb::{BnbParts, QuantStateJson};
use medvl_nf4::{Absmax, DYNAMIC_MAP, NF4_CODE, Nf4Error, Nf4Tensor, quantize};
use safetensors::{Dtype, SafeTensors};

struct Fixture {
    tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    cases: Vec<String>,
}

fn fixture() -> Fixture {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/nf4/reference.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Vec<String> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    Fixture { tensors, cases }
}

impl Fixture {
    fn f32s(&self, name: &str) -> Vec<f32> {
        let (dtype, _, bytes) = &self.tensors[name];
        match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            other => panic!("{name}: {other:?}"),
        }
    }
    fn u8s(&self, name: &str) -> Vec<u8> {
        self.tensors[name].2.clone()
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.tensors[name].1.clone()
    }
}

/// bitsandbytes returns dequantized weights in the input dtype: round ours the same way for the bf16 case.
fn as_input_dtype(case: &str, values: Vec<f32>) -> Vec<f32> {
    if case.starts_with("bf16") {
        values
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect()
    } else {
        values
    }
}

fn blocksize(case: &str) -> usize {
    case.strip_prefix("bs")
        .and_then(|r| r.split('_').next())
        .map_or(64, |b| b.parse().unwrap())
}

#[test]
fn codebooks_equal_bitsandbytes() {
    let f = fixture();
    assert_eq!(f.f32s("normal_128x320.dq.quant_map"), NF4_CODE.to_vec());
    assert_eq!(
        f.f32s("normal_128x320.dq.nested_quant_map"),
        DYNAMIC_MAP.to_vec()
    );
}

#[test]
fn nf4_codes_scales_and_dequant_are_bit_exact() {
    let f = fixture();
    assert_eq!(f.cases.len(), 8);
    for case in &f.cases {
        let input = f.f32s(&format!("{case}.input"));
        let q = quantize(
            &input,
            &f.shape(&format!("{case}.input")),
            blocksize(case),
            false,
        )
        .unwrap();
        q.validate().unwrap();
        assert_eq!(
            q.packed,
            f.u8s(&format!("{case}.packed")),
            "{case}: packed codes"
        );
        assert_eq!(
            q.absmax,
            Absmax::Plain(f.f32s(&format!("{case}.absmax"))),
            "{case}: absmax"
        );
        assert_eq!(
            as_input_dtype(case, q.dequantize()),
            f.f32s(&format!("{case}.dequant")),
            "{case}: dequantized"
        );
    }
}

/// The load path: a checkpoint's double-quantized state (codes, nested scales, map, offset) dequantizes to exactly
/// what bitsandbytes gives.
#[test]
fn stored_double_quant_state_dequantizes_bit_exact() {
    let f = fixture();
    for case in &f.cases {
        let state: serde_json::Value =
            serde_json::from_slice(&f.u8s(&format!("{case}.dq.quant_state"))).unwrap();
        let tensor = Nf4Tensor {
            packed: f.u8s(&format!("{case}.packed")),
            absmax: Absmax::Double {
                codes: f.u8s(&format!("{case}.dq.absmax")),
                nested_absmax: f.f32s(&format!("{case}.dq.nested_absmax")),
                nested_code: f.f32s(&format!("{case}.dq.nested_quant_map")),
                offset: state["nested_offset"].as_f64().unwrap() as f32,
            },
            blocksize: state["blocksize"].as_u64().unwrap() as usize,
            shape: serde_json::from_value(state["shape"].clone()).unwrap(),
        };
        tensor.validate().unwrap();
        assert_eq!(
            as_input_dtype(case, tensor.dequantize()),
            f.f32s(&format!("{case}.dq.dequant")),
            "{case}"
        );
    }
}

/// The quantize path of double quantization. The offset is the mean of the scales: we compute it correctly rounded,
/// torch with a vectorized cascade sum, so the two may differ in the last bits (<= 4 ulp here), and with them the
/// nested scales (relative 1e-6). The 8-bit codes then equal bitsandbytes' except on near ties, where either
/// neighbouring code is as good: each such difference is one code step with distances within 1e-5 of each other,
/// and they are rare.
#[test]
fn double_quantization_matches_bitsandbytes() {
    let f = fixture();
    let (mut compared, mut near_ties) = (0, 0);
    for case in &f.cases {
        let input = f.f32s(&format!("{case}.input"));
        let q = quantize(
            &input,
            &f.shape(&format!("{case}.input")),
            blocksize(case),
            true,
        )
        .unwrap();
        q.validate().unwrap();
        let Absmax::Double {
            codes,
            nested_absmax,
            offset,
            ..
        } = &q.absmax
        else {
            panic!("{case}: not double")
        };
        let state: serde_json::Value =
            serde_json::from_slice(&f.u8s(&format!("{case}.dq.quant_state"))).unwrap();
        let theirs = state["nested_offset"].as_f64().unwrap() as f32;
        assert!(
            (offset - theirs).abs() <= 4.0 * theirs.abs() * f32::EPSILON,
            "{case}: offset {offset} vs {theirs}"
        );
        for (a, b) in nested_absmax
            .iter()
            .zip(f.f32s(&format!("{case}.dq.nested_absmax")))
        {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{case}: nested absmax {a} vs {b}"
            );
        }
        let expected = f.u8s(&format!("{case}.dq.absmax"));
        assert_eq!(codes.len(), expected.len());
        let plain = f.f32s(&format!("{case}.absmax"));
        for (b, (&ours, &theirs)) in codes.iter().zip(&expected).enumerate() {
            compared += 1;
            if ours != theirs {
                near_ties += 1;
                assert_eq!(ours.abs_diff(theirs), 1, "{case} block {b}");
                let x = (plain[b] - offset) / nested_absmax[b / 256];
                let (a, c) = (DYNAMIC_MAP[ours as usize], DYNAMIC_MAP[theirs as usize]);
                assert!(
                    ((x - a).abs() - (x - c).abs()).abs() < 1e-5,
                    "{case} block {b}: not a near tie"
                );
            }
        }
    }
    assert!(
        compared > 1000 && near_ties * 200 <= compared,
        "{near_ties} near ties in {compared}"
    );
}

#[test]
fn bad_input_is_rejected_with_a_clear_error() {
    assert_eq!(
        quantize(&[0.0; 64], &[64], 48, false).unwrap_err(),
        Nf4Error::Blocksize(48)
    );
    assert_eq!(
        quantize(&[0.0; 64], &[64], 8192, false).unwrap_err(),
        Nf4Error::Blocksize(8192)
    );
    let mut values = vec![0.5f32; 64];
    values[17] = f32::NAN;
    assert!(matches!(
        quantize(&values, &[64], 64, false).unwrap_err(),
        Nf4Error::NonFinite { index: 17, .. }
    ));
    values[17] = f32::INFINITY;
    let err = quantize(&values, &[64], 64, false).unwrap_err().to_string();
    assert!(err.contains("non-finite") && err.contains("17"), "{err}");
    assert!(matches!(
        quantize(&[0.0; 63], &[8, 8], 64, false).unwrap_err(),
        Nf4Error::Inconsistent(_)
    ));
}

#[test]
fn dequant_error_is_within_half_a_code_step() {
    // Invariant with no reference: every value lands within half the widest NF4 gap (0.152) of itself, scaled.
    let values: Vec<f32> = (0..4096)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let q = quantize(&values, &[64, 64], 64, false).unwrap();
    let absmax = q.absmax.to_f32();
    for (i, (a, b)) in q.dequantize().iter().zip(&values).enumerate() {
        assert!((a - b).abs() <= 0.16 * absmax[i / 64], "{i}: {a} vs {b}");
    }
}

/// The stored parts of bitsandbytes' double-quantized state assemble into a tensor and are written back equal,
/// the JSON state included.
#[test]
fn bnb_parts_round_trip() {
    let f = fixture();
    for case in &f.cases {
        let state_bytes = f.u8s(&format!("{case}.dq.quant_state"));
        let state: QuantStateJson = serde_json::from_slice(&state_bytes).unwrap();
        let parts = BnbParts {
            weight: f.u8s(&format!("{case}.packed")),
            absmax_u8: Some(f.u8s(&format!("{case}.dq.absmax"))),
            absmax_f32: None,
            quant_map: f.f32s(&format!("{case}.dq.quant_map")),
            nested_absmax: Some(f.f32s(&format!("{case}.dq.nested_absmax"))),
            nested_quant_map: Some(f.f32s(&format!("{case}.dq.nested_quant_map"))),
            state,
        };
        let tensor = parts.clone().into_tensor().unwrap();
        let written = BnbParts::from_tensor(&tensor, &parts.state.dtype);
        assert_eq!(written, parts, "{case}");
        let ours: serde_json::Value = serde_json::from_slice(&written.state_bytes()).unwrap();
        let theirs: serde_json::Value = serde_json::from_slice(&state_bytes).unwrap();
        assert_eq!(ours, theirs, "{case}");
    }
    // Missing nested parts are a clear error.
    let mut broken = BnbParts::from_tensor(
        &quantize(&[0.5; 128], &[2, 64], 64, true).unwrap(),
        "float32",
    );
    broken.nested_absmax = None;
    assert!(
        broken
            .into_tensor()
            .unwrap_err()
            .to_string()
            .contains("nested_absmax")
    );
}

/// Large tensors are quantized on several threads, split at block boundaries: the result equals quantizing each
/// block alone (whose codes the bitsandbytes fixtures check), the tail block and double quantization included.
#[test]
fn threaded_quantization_equals_block_by_block() {
    let (rows, cols) = (7, 100_003); // 700,021 values: many blocks per thread, an odd tail block
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as u64 * 2_654_435_761) % 20_011) as f32 / 10_005.0 - 1.0)
        .collect();
    let whole = quantize(&values, &[rows, cols], 64, true).unwrap();
    let mut codes = Vec::new();
    let mut absmax = Vec::new();
    for block in values.chunks(64) {
        let q = quantize(block, &[block.len()], 64, false).unwrap();
        let nibbles = q.packed.iter().flat_map(|b| [b >> 4, b & 0xF]);
        codes.extend(nibbles.take(block.len()));
        absmax.extend(q.absmax.to_f32());
    }
    let unpacked: Vec<u8> = whole
        .packed
        .iter()
        .flat_map(|b| [b >> 4, b & 0xF])
        .collect();
    assert_eq!(unpacked.len(), codes.len() + 1);
    assert_eq!(&unpacked[..codes.len()], &codes[..]);
    assert_eq!(medvl_nf4::double_quantize(&absmax), whole.absmax);
}
