//! Evaluation metrics for medvl, as pure functions plus an aggregator. Never depends on the server or training.
//!
//! - [`legacy`]: the reference pipeline's term accuracy, value accuracy and their mean ("combined"), kept
//!   reproducible for side-by-side tables, with its known blind spots documented.
//! - [`text`]: normalisation and word-boundary matching (the fix for the legacy metric's "42" inside "142").
//! - [`fields`]: field-level precision, recall and F1 per field type, strict and lenient.
//! - [`vqa`]: PathVQA yes/no accuracy, exact match, token F1, and DocVQA's ANLS.
//! - [`aggregate`]: means with bootstrap 95% confidence intervals.
//! - [`report`]: one run's document scores aggregated per document type and overall, as JSON and markdown, and
//!   two runs side by side.

pub mod aggregate;
pub mod fields;
pub mod legacy;
pub mod report;
pub mod text;
pub mod vqa;
