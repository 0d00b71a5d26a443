//! Sampler behaviour and stop conditions.

use ferroq::internals::sampling::{
    argmax, stop_ids_from_generation_config, Sampler, SamplerConfig, Stop, StopCondition,
};

fn logits() -> Vec<f32> {
    (0..1000)
        .map(|i| ((i * 7919 % 1000) as f32) / 100.0)
        .collect()
}

#[test]
fn greedy_is_argmax() {
    let mut l = logits();
    let best = argmax(&l);
    assert_eq!(l[best as usize], 9.99);
    let mut s = Sampler::new(SamplerConfig::default(), l.len());
    assert_eq!(s.sample(&mut l, &[]), best);
    assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
    assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
}

#[test]
fn same_seed_same_output() {
    let cfg = SamplerConfig {
        temperature: 1.5,
        top_k: 50,
        top_p: 0.9,
        min_p: 0.01,
        seed: 42,
        ..Default::default()
    };
    let run = |cfg: &SamplerConfig| {
        let mut s = Sampler::new(cfg.clone(), 1000);
        let mut hist = Vec::new();
        for _ in 0..100 {
            let mut l = logits();
            let t = s.sample(&mut l, &hist);
            hist.push(t);
        }
        hist
    };
    let a = run(&cfg);
    assert_eq!(a, run(&cfg));
    let b = run(&SamplerConfig {
        seed: 43,
        ..cfg.clone()
    });
    assert_ne!(a, b);
    // More than one distinct token is drawn at temperature 1.5.
    let mut d = a.clone();
    d.sort();
    d.dedup();
    assert!(d.len() > 3);
}

#[test]
fn top_k_and_top_p_restrict_the_choice() {
    let mut l = logits();
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap());
    let top3: Vec<u32> = order[..3].iter().map(|&i| i as u32).collect();
    let mut s = Sampler::new(
        SamplerConfig {
            temperature: 100.0,
            top_k: 3,
            seed: 1,
            ..Default::default()
        },
        l.len(),
    );
    for _ in 0..200 {
        l = logits();
        assert!(top3.contains(&s.sample(&mut l, &[])));
    }
    // top_p tiny: always the best.
    let mut s = Sampler::new(
        SamplerConfig {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 3,
            ..Default::default()
        },
        l.len(),
    );
    for _ in 0..50 {
        l = logits();
        assert_eq!(s.sample(&mut l, &[]), top3[0]);
    }
    // min_p near 1: only the best.
    let mut s = Sampler::new(
        SamplerConfig {
            temperature: 1.0,
            min_p: 0.999,
            seed: 3,
            ..Default::default()
        },
        l.len(),
    );
    for _ in 0..50 {
        l = logits();
        assert_eq!(s.sample(&mut l, &[]), top3[0]);
    }
}

#[test]
fn penalties() {
    let mut s = Sampler::new(
        SamplerConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        },
        4,
    );
    let mut l = vec![4.0, 3.0, -1.0, 0.5];
    assert_eq!(s.sample(&mut l, &[0, 0, 2]), 1);
    assert_eq!(l, vec![2.0, 3.0, -2.0, 0.5]); // each token penalised once
    let mut s = Sampler::new(
        SamplerConfig {
            presence_penalty: 1.0,
            frequency_penalty: 0.5,
            penalty_last_n: 2,
            ..Default::default()
        },
        4,
    );
    let mut l = vec![4.0, 3.0, 1.0, 0.5];
    s.sample(&mut l, &[0, 1, 1]); // window [1, 1]
    assert_eq!(l, vec![4.0, 1.0, 1.0, 0.5]);
}

#[test]
fn config_validation() {
    assert!(SamplerConfig::default().validate().is_ok());
    assert!(SamplerConfig {
        temperature: f32::NAN,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(SamplerConfig {
        top_p: 0.0,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(SamplerConfig {
        repetition_penalty: 0.0,
        ..Default::default()
    }
    .validate()
    .is_err());
}

#[test]
fn stop_strings_are_held_back_and_cut() {
    let mut sc = StopCondition::new(vec![2], vec!["</end>".into(), "STOP".into()]);
    let mut out = String::new();
    assert_eq!(sc.push(5, "Hello </", &mut out), Stop::No);
    assert_eq!(out, "Hello "); // "</" could start "</end>"
    assert_eq!(sc.push(6, "en", &mut out), Stop::No);
    assert_eq!(out, "Hello ");
    assert_eq!(sc.push(7, "d> tail", &mut out), Stop::String);
    assert_eq!(out, "Hello ");
    let mut sc = StopCondition::new(vec![2], vec!["STOP".into()]);
    let mut out = String::new();
    assert_eq!(sc.push(5, "a ST", &mut out), Stop::No);
    assert_eq!(sc.push(6, "ay é", &mut out), Stop::No);
    assert_eq!(out, "a STay é");
    assert_eq!(sc.push(2, "", &mut out), Stop::Token);
    sc.push_text("S", &mut out);
    sc.finish(&mut out);
    assert_eq!(out, "a STay éS");
}

#[test]
fn generation_config_stop_ids() {
    assert_eq!(
        stop_ids_from_generation_config(br#"{"eos_token_id": [200001, 200007, 200008]}"#).unwrap(),
        vec![200001, 200007, 200008]
    );
    assert_eq!(
        stop_ids_from_generation_config(br#"{"eos_token_id": 2}"#).unwrap(),
        vec![2]
    );
    assert!(stop_ids_from_generation_config(br#"{"eos_token_id": "x"}"#).is_err());
    assert!(stop_ids_from_generation_config(b"{").is_err());
}
