//! The decode plan (medvl's own kernels, `medvl_engine::plan`) against transformers and against the burn decode
//! path: the tiny reference model's three prompts (one image, two images, text only: three different lengths)
//! prefilled by burn, then decoded together in one plan for 31 steps; the greedy tokens must be transformers'
//! (`fixtures/generate.py`), and the logits of a step must equal burn's decode logits at the same position.
//!
//! The same with NF4 weights and with a PEFT LoRA adapter (unmerged; dense and NF4 base): logits against burn's.
//!
//! CI runs the kernels through CubeCL's wgpu runtime on Mesa's lavapipe (f32); on the GPU machine the same check
//! runs on CUDA in bf16 and f32 (`--ignored`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use burn::prelude::*;
use cubecl::prelude::{ComputeClient, Runtime};
use medvl_engine::{DecodePlan, Prefilled};
use medvl_kernels::nf4::Activation;
use medvl_model::layers::LinearWeight;
use medvl_model::{QuantizeOptions, QwenVl, load_dir};

use common::{Case, cases, fixtures};

/// The largest absolute difference between two rows of logits.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Prefills `case` through burn: its cache, rotary offset and greedy first token.
fn prefill<B: Backend>(
    model: &QwenVl<B>,
    case: &Case,
    device: &B::Device,
) -> (medvl_model::KvCache<B>, i64, u32) {
    let mut cache = model.new_cache();
    let prefill = model
        .prefill(&case.prompt, &case.images, &mut cache, device)
        .unwrap();
    let l = case.prompt.len();
    let logits = model.logits(prefill.hidden.narrow(1, l - 1, 1));
    let first = argmax(&logits.into_data().convert::<f32>().to_vec::<f32>().unwrap());
    (cache, prefill.positions.rope_delta, first)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Decodes `slots` sequences together (slot `i` takes case `i % 3`) and returns, per slot, the case and how many
/// of its 32 greedy tokens equal transformers'; asserts the first step's logits against burn's decode of the same
/// token within `tolerance` (relative to the largest logit).
fn run<B: Backend, R: Runtime, F: Activation>(
    model: &QwenVl<B>,
    device: &B::Device,
    client: &ComputeClient<R>,
    slots: usize,
    tolerance: f32,
) -> Vec<(String, usize)> {
    let three = cases();
    let cases: Vec<&Case> = (0..slots).map(|i| &three[i % three.len()]).collect();
    let vocab = model.config.text.vocab_size;
    let capacity = cases.iter().map(|c| c.prompt.len()).max().unwrap() + 40;
    let mut plan = DecodePlan::<R, F>::from_model(client, model, cases.len(), capacity).unwrap();
    let mut caches = Vec::new();
    let mut tokens: Vec<Vec<u32>> = Vec::new();
    for (slot, case) in cases.iter().enumerate() {
        let (cache, rope_delta, first) = prefill(model, case, device);
        plan.admit(
            slot,
            &Prefilled::from_cache(&cache, rope_delta, first).unwrap(),
        )
        .unwrap();
        caches.push((cache, rope_delta));
        tokens.push(vec![first]);
    }
    assert_eq!(
        plan.lens(),
        cases.iter().map(|c| c.prompt.len()).collect::<Vec<_>>()
    );
    for step in 1..32 {
        let fed: Vec<u32> = tokens.iter().map(|t| *t.last().unwrap()).collect();
        let next = plan.step().unwrap();
        if step == 1 {
            // The same token through burn's decode path: logits at the same position.
            let logits = plan.logits().unwrap();
            for (i, (cache, rope_delta)) in caches.iter_mut().enumerate() {
                let hidden = model.decode(&[fed[i]], *rope_delta, cache, device).unwrap();
                let reference = model
                    .logits(hidden)
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap();
                let ours = &logits[i * vocab..(i + 1) * vocab];
                let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = max_diff(ours, &reference);
                eprintln!(
                    "{}: step-1 logits max |plan - burn| = {worst:.3e} (max |logit| {scale:.3})",
                    cases[i].name
                );
                assert!(
                    worst <= tolerance * scale,
                    "{}: {worst} > {tolerance} x {scale}",
                    cases[i].name
                );
                assert_eq!(next[i], argmax(&reference), "{}", cases[i].name);
            }
        }
        for (t, id) in tokens.iter_mut().zip(next) {
            t.push(id);
        }
    }
    assert_eq!(
        plan.lens(),
        cases
            .iter()
            .map(|c| c.prompt.len() + 31)
            .collect::<Vec<_>>()
    );
    cases
        .iter()
        .zip(&tokens)
        .map(|(case, got)| {
            let same = got
                .iter()
                .zip(&case.expected)
                .take_while(|(a, b)| a == b)
                .count();
            eprintln!("{}: {same}/32 tokens equal transformers'", case.name);
            (case.name.to_string(), same)
        })
        .collect()
}

/// The tiny model quantized to NF4 while loading with `options` (`--quant nf4` or `nf4-all`).
fn load_nf4<B: Backend>(device: &B::Device, options: QuantizeOptions) -> QwenVl<B> {
    let embedding = options.embedding;
    let model =
        medvl_model::load_dir_with::<B>(&fixtures().join("hub"), device, Some(options)).unwrap();
    assert!(model.text.layers[0].mlp.up_proj.is_quantized());
    assert_eq!(
        matches!(model.text.embed_tokens, LinearWeight::Nf4(_)),
        embedding
    );
    model
}

#[test]
fn plan_on_wgpu_decodes_three_prompts_as_transformers() {
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    let device = Default::default();
    let model = load_dir::<medvl_model::backend::Cpu>(&fixtures().join("hub"), &device).unwrap();
    let client = WgpuRuntime::client(&WgpuDevice::default());
    // 10 sequences: the GEMVs take 8 rows per launch, so this also runs them in two groups.
    let counts = run::<_, _, f32>(&model, &device, &client, 10, 1e-4);
    assert_eq!(counts.len(), 10);
    for (case, same) in counts {
        assert_eq!(same, 32, "{case}");
    }
}

#[test]
fn plan_on_wgpu_runs_nf4_weights_as_burn() {
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    let device = Default::default();
    let client = WgpuRuntime::client(&WgpuDevice::default());
    // With the lm_head and the embedding NF4 too (`nf4-all`), the plan looks its input rows up in the NF4 table.
    for options in [QuantizeOptions::default(), QuantizeOptions::everything()] {
        let model = load_nf4::<medvl_model::backend::Cpu>(&device, options);
        // The step's logits are asserted against burn's NF4 decode; NF4 tokens need not be transformers' f32
        // ones.
        let counts = run::<_, _, f32>(&model, &device, &client, 3, 1e-4);
        assert_eq!(counts.len(), 3);
    }
}

/// The tiny reference model with the PEFT adapter of `fixtures/lora.py` (rank 4 with a rank/alpha pattern entry, on
/// decoder and vision modules) applied unmerged.
fn with_adapter<B: Backend>(mut model: QwenVl<B>, device: &B::Device) -> QwenVl<B> {
    let summary =
        medvl_model::lora::apply_adapter(&mut model, &fixtures().join("lora"), device).unwrap();
    assert!(summary.modules > 0);
    assert!(model.text.layers[0].self_attn.q_proj.lora.is_some());
    model
}

#[test]
fn plan_on_wgpu_runs_lora_adapters_as_burn() {
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    let device = Default::default();
    let client = WgpuRuntime::client(&WgpuDevice::default());
    // Dense base, 10 sequences (the adapters' products in two GEMV groups too); then an NF4 base. The step's
    // logits are asserted against burn's decode with the same adapter (the adapter moves them by about as much
    // as they are large, so a plan that skipped it would fail).
    let model = load_dir::<medvl_model::backend::Cpu>(&fixtures().join("hub"), &device).unwrap();
    let model = with_adapter(model, &device);
    assert_eq!(
        run::<_, _, f32>(&model, &device, &client, 10, 1e-4).len(),
        10
    );
    let model = with_adapter(
        load_nf4::<medvl_model::backend::Cpu>(&device, QuantizeOptions::default()),
        &device,
    );
    assert_eq!(run::<_, _, f32>(&model, &device, &client, 3, 1e-4).len(), 3);
}

#[test]
fn engine_decodes_greedy_requests_through_an_attached_plan() {
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    use medvl_engine::{Engine, GenerateParams};
    let mut engine =
        Engine::<medvl_model::backend::Cpu>::load(&fixtures().join("hub"), Default::default())
            .unwrap();
    let client = WgpuRuntime::client(&WgpuDevice::default());
    // Room for the two-image prompt (80 tokens) plus 32: the others fit too; 20 more tokens do not.
    let plan = DecodePlan::<WgpuRuntime, f32>::from_model(&client, engine.model(), 1, 112).unwrap();
    engine.attach_plan(Box::new(plan));
    assert!(engine.has_plan());
    let params = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(32)
    };
    for case in cases() {
        let out = engine
            .generate_ids(&case.prompt, &case.images, &params, |_| {})
            .unwrap();
        assert_eq!(out.token_ids, case.expected, "{}", case.name);
        assert!(out.plan_decode, "{}", case.name);
    }
    // Past the plan's capacity the request decodes through burn, with the same tokens.
    let case = &cases()[1];
    let longer = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(40)
    };
    let out = engine
        .generate_ids(&case.prompt, &case.images, &longer, |_| {})
        .unwrap();
    assert!(!out.plan_decode);
    assert_eq!(out.token_ids[..32], case.expected[..]);
}

/// Two engines over the tiny model on burn's CPU backend: one with a decode plan of `batch` sequences of
/// `capacity` tokens on wgpu (f32) attached, one without.
fn engines_on_wgpu(
    batch: usize,
    capacity: usize,
) -> (
    medvl_engine::Engine<medvl_model::backend::Cpu>,
    medvl_engine::Engine<medvl_model::backend::Cpu>,
) {
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    let load = || medvl_engine::Engine::load(&fixtures().join("hub"), Default::default()).unwrap();
    let (mut planned, burn) = (load(), load());
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let plan =
        DecodePlan::<WgpuRuntime, f32>::from_model(&client, planned.model(), batch, capacity)
            .unwrap();
    planned.attach_plan(Box::new(plan));
    (planned, burn)
}

/// Three ways of sampling: temperature + top-p; temperature + top-k + repetition penalty; greedy with a penalty.
fn sampled_settings() -> [medvl_engine::SamplingParams; 3] {
    use medvl_engine::SamplingParams;
    [
        SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: 7,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.2,
            top_k: 40,
            repetition_penalty: 1.3,
            seed: 11,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.5,
            ..Default::default()
        },
    ]
}

/// Requests that sample (temperature, top-k, top-p, repetition penalty) decode through an attached plan, which
/// samples on the device with the request's draws: the same tokens as the engine without a plan (burn's logits,
/// the host sampler) for the same seed; other seeds give other tokens.
#[test]
fn engine_samples_through_an_attached_plan_as_without() {
    use medvl_engine::{Engine, GenerateParams, SamplingParams};
    let (planned, burn) = engines_on_wgpu(1, 112);
    let samplings = sampled_settings();
    for case in cases() {
        for sampling in &samplings {
            let params = GenerateParams {
                sampling: sampling.clone(),
                ignore_eos: true,
                ..GenerateParams::greedy(24)
            };
            let generate = |engine: &Engine<_>, params: &GenerateParams| {
                engine
                    .generate_ids(&case.prompt, &case.images, params, |_| {})
                    .unwrap()
            };
            let ours = generate(&planned, &params);
            let theirs = generate(&burn, &params);
            assert!(ours.plan_decode && !theirs.plan_decode);
            assert_eq!(
                ours.token_ids, theirs.token_ids,
                "{} {sampling:?}",
                case.name
            );
            if sampling.temperature > 0.0 {
                let other = GenerateParams {
                    sampling: SamplingParams {
                        seed: sampling.seed + 1,
                        ..sampling.clone()
                    },
                    ..params.clone()
                };
                assert_ne!(generate(&planned, &other).token_ids, ours.token_ids);
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    use medvl_model::backend::{CudaBf16, CudaF32};

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn plan_on_cuda_f32_decodes_three_prompts_as_transformers() {
        let device = Default::default();
        let model = load_dir::<CudaF32>(&fixtures().join("hub"), &device).unwrap();
        let client = CudaRuntime::client(&CudaDevice::default());
        // burn's CUDA matmuls run in TF32: the plan's f32 GEMVs do not, hence the wider tolerance.
        for (case, same) in run::<_, _, f32>(&model, &device, &client, 3, 1e-2) {
            assert_eq!(same, 32, "{case}");
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn plan_on_cuda_bf16_matches_burn() {
        let device = Default::default();
        let model = load_dir::<CudaBf16>(&fixtures().join("hub"), &device).unwrap();
        let client = CudaRuntime::client(&CudaDevice::default());
        // bf16: the step's logits within bf16 rounding of burn's, and at least the first 8 greedy tokens equal
        // transformers' f32 ones (the model issue's bf16 criterion; H100: 32 of 32 on all three prompts).
        let counts = run::<_, _, half::bf16>(&model, &device, &client, 3, 5e-2);
        for (case, same) in counts {
            assert!(same >= 8, "{case}: {same} tokens");
        }
    }
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn plan_on_cuda_bf16_runs_ten_dense_sequences_on_tensor_cores() {
        let device = Default::default();
        let model = load_dir::<CudaBf16>(&fixtures().join("hub"), &device).unwrap();
        let client = CudaRuntime::client(&CudaDevice::default());
        // 10 sequences: past the GEMV's 8 rows, every dense product runs on the tensor-core GEMV.
        assert!(medvl_kernels::mma::supported::<CudaRuntime, half::bf16>(
            &client
        ));
        let counts = run::<_, _, half::bf16>(&model, &device, &client, 10, 5e-2);
        for (case, same) in counts {
            assert!(same >= 8, "{case}: {same} tokens");
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn plan_on_cuda_bf16_nf4_runs_ten_sequences_on_tensor_cores() {
        let device = Default::default();
        let model = load_nf4::<CudaBf16>(&device, QuantizeOptions::default());
        let client = CudaRuntime::client(&CudaDevice::default());
        // 10 sequences: past the GEMV's 8 rows, every NF4 projection runs as one tensor-core GEMM.
        assert!(medvl_kernels::gemm::supported::<CudaRuntime, half::bf16>(
            &client
        ));
        let counts = run::<_, _, half::bf16>(&model, &device, &client, 10, 5e-2);
        assert_eq!(counts.len(), 10);
    }

    /// burn's logits of the first decode step of `case` (prefill, then the prefill's greedy token).
    fn burn_step_logits(
        model: &QwenVl<CudaBf16>,
        case: &Case,
        device: &burn::backend::cuda::CudaDevice,
    ) -> (Vec<f32>, Prefilled) {
        let (mut cache, rope_delta, first) = prefill(model, case, device);
        let prefilled = Prefilled::from_cache(&cache, rope_delta, first).unwrap();
        let hidden = model
            .decode(&[first], rope_delta, &mut cache, device)
            .unwrap();
        let logits = model
            .logits(hidden)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        (logits, prefilled)
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn engine_on_cuda_bf16_batches_requests_as_one_at_a_time() {
        use medvl_engine::Engine;
        // bf16 rounds the plan's and burn's logits differently: the reference is the same engine's plan with one
        // request at a time, which multiplies each row as a batch of two does.
        for (label, quantize) in [("bf16", None), ("nf4", Some(QuantizeOptions::default()))] {
            let mut planned = Engine::<CudaBf16>::load_with(
                &fixtures().join("hub"),
                Default::default(),
                quantize,
            )
            .unwrap();
            let client = CudaRuntime::client(&CudaDevice::default());
            let plan = DecodePlan::<CudaRuntime, half::bf16>::sharing_model(
                &client,
                planned.model_mut(),
                2,
                160,
            )
            .unwrap();
            planned.attach_plan(Box::new(plan));
            eprintln!("{label}");
            assert_batches_as_alone(&planned, |request| {
                planned.generate(request, |_| {}).unwrap()
            });
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn plan_on_cuda_bf16_shares_the_model_weights() {
        let device = Default::default();
        let client = CudaRuntime::client(&CudaDevice::default());
        let case = &cases()[0];
        for (label, quantize) in [
            ("bf16", None),
            ("nf4", Some(QuantizeOptions::default())),
            ("nf4-all", Some(QuantizeOptions::everything())),
        ] {
            let mut model = medvl_model::load_dir_with::<CudaBf16>(
                &fixtures().join("hub"),
                &device,
                quantize.clone(),
            )
            .unwrap();
            let (reference, prefilled) = burn_step_logits(&model, case, &device);
            let mut plan = DecodePlan::<CudaRuntime, half::bf16>::sharing_model(
                &client,
                &mut model,
                1,
                case.prompt.len() + 8,
            )
            .unwrap();
            // The model's q/k/v now read the plan's stacked matrix: burn computes the same logits as before.
            let q = &model.text.layers[0].self_attn.q_proj.weight;
            assert_eq!(
                matches!(q, LinearWeight::Nf4(_)),
                quantize.is_some(),
                "{label}: the format stays"
            );
            assert_eq!(
                matches!(model.text.embed_tokens, LinearWeight::Nf4(_)),
                label == "nf4-all",
                "{label}: the embedding's format stays"
            );
            let (after, _) = burn_step_logits(&model, case, &device);
            let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
            let moved = max_diff(&after, &reference);
            eprintln!("{label}: burn after sharing moved {moved:.3e}");
            assert!(moved <= 1e-3 * scale, "{moved} (max |logit| {scale})");
            // The plan gives burn's logits; the prefill's keys and values reach it on the device.
            plan.admit(0, &prefilled).unwrap();
            let next = plan.step().unwrap();
            let ours = plan.logits().unwrap();
            let worst = max_diff(&ours, &reference);
            eprintln!("{label}: plan vs burn {worst:.3e} (max |logit| {scale:.3})");
            assert!(worst <= 5e-2 * scale, "{worst} > 5e-2 x {scale}");
            assert_eq!(next[0], argmax(&reference));
            // Handed over through host memory instead, the same prefill gives the same step, to the bit.
            plan.release(0);
            plan.hand_over_through_host();
            plan.admit(0, &prefilled).unwrap();
            assert_eq!(plan.step().unwrap(), next);
            assert_eq!(
                plan.logits().unwrap(),
                ours,
                "{label}: host and device handover differ"
            );
            let kv = prefilled.host_kv().unwrap();
            assert_eq!(kv.len(), model.config.text.num_hidden_layers);
            assert_eq!(
                kv[0].0.len(),
                model.config.text.num_key_value_heads
                    * prefilled.len
                    * model.config.text.head_dim()
            );
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn plan_on_cuda_bf16_runs_lora_adapters_as_burn() {
        let device = Default::default();
        let client = CudaRuntime::client(&CudaDevice::default());
        // NF4 base + adapter, 1 sequence (GEMVs) and 10 (tensor-core GEMMs, the adapters' A products too).
        let model = with_adapter(
            load_nf4::<CudaBf16>(&device, QuantizeOptions::default()),
            &device,
        );
        assert_eq!(
            run::<_, _, half::bf16>(&model, &device, &client, 1, 5e-2).len(),
            1
        );
        assert_eq!(
            run::<_, _, half::bf16>(&model, &device, &client, 10, 5e-2).len(),
            10
        );
    }
}

/// Seven requests for [`assert_batches_as_alone`]: greedy and sampled ones of different lengths, one too long for
/// a plan of 160 tokens, one with bad input (an image part without an image), one ended by its first token.
fn batch_requests() -> Vec<medvl_engine::Request> {
    use medvl_engine::{Request, SamplingParams};
    use medvl_model::chat::Message;
    let image = |name: &str| std::fs::read(fixtures().join(name)).unwrap();
    let ask = |images: Vec<Vec<u8>>, prompt: &str, tokens: usize, sampling: SamplingParams| {
        let mut request = Request::ask(images, prompt, tokens);
        request.params.ignore_eos = true;
        request.params.sampling = sampling;
        request
    };
    let greedy = SamplingParams::default();
    let sampled = sampled_settings();
    let mut bad = ask(vec![], "Read the stamp.", 8, greedy.clone());
    bad.messages = vec![Message::user_with_images(1, "Read the stamp.")];
    vec![
        ask(
            vec![image("page.png")],
            "Extract the patient's name.",
            24,
            greedy.clone(),
        ),
        ask(
            vec![image("page.png"), image("stamp.png")],
            "Compare the two.",
            10,
            greedy.clone(),
        ),
        ask(
            vec![],
            "Summarise the discharge letter.",
            24,
            sampled[0].clone(),
        ),
        bad,
        ask(
            vec![image("stamp.png")],
            "What does the stamp say?",
            16,
            sampled[1].clone(),
        ),
        ask(
            vec![image("page.png")],
            "List every medication.",
            120,
            greedy.clone(),
        ),
        ask(vec![], "Yes or no?", 1, greedy),
    ]
}

/// [`batch_requests`] through `planned`'s plan of two slots at once (continuous batching: requests queue for a
/// slot, take the slot of one that ended, the last slot's sequence moved into an earlier one; the long one through
/// burn; the one ended by its first token never admitted): each gives the tokens and text `alone` gives for it; the
/// streamed pieces make up its text; the bad one fails alone; the plan is empty afterwards.
fn assert_batches_as_alone<B: Backend>(
    planned: &medvl_engine::Engine<B>,
    alone: impl Fn(&medvl_engine::Request) -> medvl_engine::Generation,
) {
    let requests = batch_requests();
    let mut streamed = vec![String::new(); requests.len()];
    let results = planned
        .generate_batch(&requests, |i, piece| streamed[i].push_str(piece))
        .unwrap();
    assert_eq!(results.len(), requests.len());
    for (i, (request, result)) in requests.iter().zip(&results).enumerate() {
        if i == 3 {
            let error = result.as_ref().unwrap_err().to_string();
            assert!(error.contains("image"), "{error}");
            continue;
        }
        let ours = result.as_ref().unwrap();
        let theirs = alone(request);
        assert_eq!(ours.token_ids, theirs.token_ids, "request {i}");
        assert_eq!(
            ours.token_ids.len(),
            request.params.max_new_tokens,
            "request {i}"
        );
        assert_eq!(ours.text, theirs.text, "request {i}");
        assert_eq!(streamed[i], ours.text, "request {i}");
        assert_eq!(
            ours.plan_decode,
            i != 5 && i != 6,
            "request {i}: {} prompt tokens",
            ours.prompt_tokens
        );
    }
    // The third request waited for the second's slot.
    let timings = |i: usize| results[i].as_ref().unwrap().timings;
    assert!(timings(2).queue_s > timings(1).queue_s + timings(1).prefill_s);
    // The plan is empty again: a single request runs through slot 0.
    let again = planned.generate(&requests[1], |_| {}).unwrap();
    assert_eq!(again.token_ids, results[1].as_ref().unwrap().token_ids);
}

/// The engine batches requests through a plan (wgpu, f32) with the tokens the engine without a plan (burn) gives
/// each request alone.
#[test]
fn engine_batches_requests_through_a_plan_as_one_at_a_time() {
    let (planned, burn) = engines_on_wgpu(2, 160);
    assert_batches_as_alone(&planned, |request| burn.generate(request, |_| {}).unwrap());
}
