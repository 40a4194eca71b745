//! Label selectors as the API server reads them: what it would refuse, and
//! whether one matches a set of labels.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::errors::FieldError;

/// The label-selector operators Kubernetes defines.
const SELECTOR_OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// Problems of a label selector, with paths under `path`: what the API
/// server's own selector parsing would refuse.
pub fn selector_problems(sel: &LabelSelector, path: &str) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let values = e.values.as_deref().unwrap_or_default();
        let at = format!("{path}.matchExpressions[{i}]");
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => out.push(FieldError {
                path: format!("{at}.values"),
                message: format!("must not be empty for operator {}", e.operator),
            }),
            "Exists" | "DoesNotExist" if !values.is_empty() => out.push(FieldError {
                path: format!("{at}.values"),
                message: format!("must be empty for operator {}", e.operator),
            }),
            op if !SELECTOR_OPERATORS.contains(&op) => out.push(FieldError {
                path: format!("{at}.operator"),
                message: format!("{op:?} is not one of In, NotIn, Exists, DoesNotExist"),
            }),
            _ => {}
        }
    }
    out
}

/// Why a selector could not be matched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// An operator other than In, NotIn, Exists and DoesNotExist.
    #[error("matchExpressions[{index}].operator: {operator:?} is not one of In, NotIn, Exists, DoesNotExist")]
    UnknownOperator {
        /// Index of the expression in `matchExpressions`.
        index: usize,
        /// The operator as written.
        operator: String,
    },
}

/// Does `sel` match `labels`? An empty selector matches everything. An
/// unknown operator is an error (see [`selector_problems`]).
pub fn selects(
    sel: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    if let Some(ml) = &sel.match_labels {
        if ml.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            return Ok(false);
        }
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => !have.is_some_and(|v| values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => {
                return Err(SelectorError::UnknownOperator {
                    index: i,
                    operator: other.to_string(),
                })
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}
