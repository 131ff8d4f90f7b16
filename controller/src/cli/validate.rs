//! `bulkhead validate FILE|DIR...`: every check the agent makes, offline,
//! before `kubectl apply` — plus the fields a kind does not have, which an
//! API server without strict field validation drops without a word.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bulkhead_policy::{manifest, rules, Object};
use serde::Serialize;

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One thing wrong (or worth knowing) about one document.
#[derive(Serialize, Debug)]
pub struct Finding {
    pub severity: Severity,
    pub file: String,
    /// From 1; 0 when the file is not YAML at all.
    pub document: usize,
    /// `Kind namespace/name`, when the document says.
    pub object: String,
    /// Where in the object, e.g. `spec.ingress[0].form`.
    pub field: String,
    pub message: String,
}

#[derive(Serialize, Default, Debug)]
pub struct Validation {
    pub files: usize,
    /// Documents of the kinds Bulkhead reads, checked.
    pub objects: usize,
    /// Documents of other kinds, passed over.
    pub skipped: usize,
    pub findings: Vec<Finding>,
}

impl Validation {
    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }
}

/// Validate files, and the `*.yaml`/`*.yml` files under folders (recursively).
pub fn validate(paths: &[PathBuf]) -> Result<Validation> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            yaml_files(path, &mut files)?;
        } else {
            files.push(path.clone());
        }
    }
    let mut validation = Validation::default();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        validate_text(&file.display().to_string(), &text, &mut validation);
        validation.files += 1;
    }
    Ok(validation)
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

/// Validate one text's documents into `validation`.
pub fn validate_text(origin: &str, text: &str, validation: &mut Validation) {
    let finding = |severity, document, object: &str, field: &str, message: &str| Finding {
        severity,
        file: origin.to_string(),
        document,
        object: object.trim().trim_start_matches('(').trim_end_matches(')').to_string(),
        field: field.to_string(),
        message: message.to_string(),
    };
    let documents = match manifest::documents(origin, text) {
        Ok(documents) => documents,
        Err(error) => {
            validation.findings.push(finding(Severity::Error, 0, "", "", &error.message));
            return;
        }
    };
    for (index, value) in documents.into_iter().enumerate() {
        let document = index + 1;
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        if !manifest::KINDS.contains(&kind) {
            validation.skipped += 1;
            continue;
        }
        validation.objects += 1;
        let object = manifest::describe(&value);
        for field in manifest::unknown_fields(&value) {
            let message = format!(
                "unknown field: {kind} has no such field (an API server without strict field validation drops it silently)"
            );
            validation.findings.push(finding(Severity::Error, document, &object, &field, &message));
        }
        let parsed = match manifest::object(origin, document, value) {
            Ok(parsed) => parsed,
            Err(error) => {
                let (field, message) = error.message.split_once(": ").unwrap_or(("", &error.message));
                validation.findings.push(finding(Severity::Error, document, &object, field, message));
                continue;
            }
        };
        let Some(Object::Policy(policy)) = parsed else { continue };
        match rules::normalize(&policy) {
            Ok(policy) => validation.findings.extend(policy.warnings.iter().map(|w| {
                finding(Severity::Warning, document, &object, &w.field, &format!("{}: {}", w.reason, w.message))
            })),
            Err(error) => validation.findings.push(finding(
                Severity::Error,
                document,
                &object,
                &error.field,
                &format!("{}: {}", error.reason, error.message),
            )),
        }
    }
}

pub fn print(validation: &Validation) {
    for f in &validation.findings {
        let severity = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let place = if f.document == 0 { String::new() } else { format!(" document {}", f.document) };
        let object = if f.object.is_empty() { String::new() } else { format!(" ({})", f.object) };
        let field = if f.field.is_empty() { String::new() } else { format!(" {}:", f.field) };
        println!("{}:{place}{object}:{field} {severity}: {}", f.file, f.message);
    }
    println!(
        "{} files, {} objects checked ({} of other kinds passed over): {} errors, {} warnings",
        validation.files,
        validation.objects,
        validation.skipped,
        validation.errors(),
        validation.findings.len() - validation.errors()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validated(text: &str) -> Validation {
        let mut validation = Validation::default();
        validate_text("policy.yaml", text, &mut validation);
        validation
    }

    #[test]
    fn a_typo_a_bad_selector_and_host_bits_are_each_named() {
        let text = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: typo, namespace: shop}\nspec:\n  podSelector: {}\n  ingress:\n    - form: [{podSelector: {}}]\n---\napiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: near, namespace: shop}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: Near, values: [x]}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bits, namespace: shop}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/16}}]}]\n---\nkind: Service\nmetadata: {name: s}\n";
        let validation = validated(text);
        let seen: Vec<(Severity, usize, &str, &str)> =
            validation.findings.iter().map(|f| (f.severity, f.document, f.object.as_str(), f.field.as_str())).collect();
        assert_eq!(
            seen,
            [
                (Severity::Error, 1, "ConnectionPolicy shop/typo", "spec.ingress[0].form"),
                (Severity::Error, 2, "ConnectionPolicy shop/near", "spec.podSelector.matchExpressions[0].operator"),
                (Severity::Warning, 3, "NetworkPolicy shop/bits", "spec.ingress[0].from[0].ipBlock.cidr"),
            ]
        );
        assert_eq!((validation.objects, validation.skipped, validation.errors()), (3, 1, 2));
    }

    #[test]
    fn a_type_error_and_broken_yaml_are_errors() {
        let wrong_type = "apiVersion: bulkhead.io/v1alpha1\nkind: ConnectionPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n    - ports: [{protocol: ICMP, port: 80}]\n";
        let validation = validated(wrong_type);
        assert_eq!(validation.errors(), 1, "{validation:?}");
        assert_eq!(validation.findings[0].field, "spec.ingress[0].ports[0].protocol");
        let broken = validated("kind: [unclosed\n");
        assert_eq!((broken.errors(), broken.findings[0].document), (1, 0));
        assert_eq!(validated("apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n").findings.len(), 0);
    }
}
