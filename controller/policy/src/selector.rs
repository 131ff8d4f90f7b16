//! Label selectors: `matchLabels` and every `matchExpressions` operator.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// Every distinct set of pod labels, held once: the replicas of a workload
/// carry the same set, so a cluster has far fewer sets than pods. Sources
/// share the sets they parse, so even a first listing holds each set once.
pub type LabelSets = crate::shared::Shared<Labels>;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

/// A validated selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn from_labels(labels: &[(&str, &str)]) -> Self {
        Self {
            requirements: labels
                .iter()
                .map(|(k, v)| Requirement { key: k.to_string(), operator: Operator::In, values: vec![v.to_string()] })
                .collect(),
        }
    }

    /// Parse a Kubernetes LabelSelector; `Err` says which field is wrong and why.
    pub fn parse(selector: &LabelSelector) -> Result<Self, (String, String)> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            check_label_key(key).map_err(|why| (format!("matchLabels.{key}"), why))?;
            check_label_value(value).map_err(|why| (format!("matchLabels.{key}"), why))?;
            requirements.push(Requirement { key: key.clone(), operator: Operator::In, values: vec![value.clone()] });
        }
        for (index, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let field = format!("matchExpressions[{index}]");
            check_label_key(&expr.key).map_err(|why| (format!("{field}.key"), why))?;
            let values = expr.values.clone().unwrap_or_default();
            let operator = match expr.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err((
                        format!("{field}.operator"),
                        format!("unknown operator {other:?}: In, NotIn, Exists or DoesNotExist"),
                    ))
                }
            };
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err((
                        format!("{field}.values"),
                        format!("operator {} needs at least one value", expr.operator),
                    ))
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err((format!("{field}.values"), format!("operator {} takes no values", expr.operator)))
                }
                _ => {}
            }
            for value in &values {
                check_label_value(value).map_err(|why| (format!("{field}.values"), why))?;
            }
            let mut values = values;
            values.sort();
            values.dedup();
            requirements.push(Requirement { key: expr.key.clone(), operator, values });
        }
        requirements.sort();
        requirements.dedup();
        Ok(Self { requirements })
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.operator {
                Operator::In => value.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Operator::NotIn => value.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
    }
}

fn check_label_key(key: &str) -> Result<(), String> {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(is_dns_label) {
                return Err(format!("label key {key:?} has an invalid prefix"));
            }
            name
        }
        None => key,
    };
    if name.is_empty() || name.len() > 63 || !is_label_name(name) {
        return Err(format!("label key {key:?} is not a valid label name"));
    }
    Ok(())
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 || !is_label_name(value) {
        return Err(format!(
            "label value {value:?} is not valid (63 characters of [A-Za-z0-9_.-], alphanumeric at both ends)"
        ));
    }
    Ok(())
}

fn is_label_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: if values.is_empty() { None } else { Some(values.iter().map(|v| v.to_string()).collect()) },
            }]),
            match_labels: None,
        }
    }

    #[test]
    fn every_operator() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let cases = [
            (expr("app", "In", &["web", "db"]), true),
            (expr("app", "In", &["db"]), false),
            (expr("app", "NotIn", &["db"]), true),
            (expr("app", "NotIn", &["web"]), false),
            (expr("missing", "NotIn", &["x"]), true),
            (expr("tier", "Exists", &[]), true),
            (expr("missing", "Exists", &[]), false),
            (expr("missing", "DoesNotExist", &[]), true),
            (expr("tier", "DoesNotExist", &[]), false),
        ];
        for (selector, expected) in cases {
            assert_eq!(Selector::parse(&selector).unwrap().matches(&pod), expected, "{selector:?}");
        }
        assert!(Selector::parse(&LabelSelector::default()).unwrap().matches(&pod));
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        let (field, why) = Selector::parse(&expr("app", "Near", &["x"])).unwrap_err();
        assert_eq!(field, "matchExpressions[0].operator");
        assert!(why.contains("Near"));
        let (field, _) = Selector::parse(&expr("app", "In", &[])).unwrap_err();
        assert_eq!(field, "matchExpressions[0].values");
        let (field, _) = Selector::parse(&expr("app", "Exists", &["x"])).unwrap_err();
        assert_eq!(field, "matchExpressions[0].values");
        let (field, _) = Selector::parse(&expr("bad key!", "Exists", &[])).unwrap_err();
        assert_eq!(field, "matchExpressions[0].key");
        let bad_value = LabelSelector {
            match_labels: Some([("app".to_string(), "-x".to_string())].into()),
            match_expressions: None,
        };
        assert_eq!(Selector::parse(&bad_value).unwrap_err().0, "matchLabels.app");
    }
}
