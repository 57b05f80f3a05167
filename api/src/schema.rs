//! Schema pieces shared by more than one resource: CEL rules and their messages, so
//! that the same kind of value is checked the same way (and says the same thing)
//! everywhere, and the transforms that keep field docs readable in `kubectl explain`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};

/// A model version: 1 to 63 characters, letters, digits, '.', '_' and '-', starting
/// with a letter or digit (semver and dates both fit).
pub(crate) const VERSION_RULE: &str = "self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*$')";
pub(crate) const VERSION_MESSAGE: &str = "version must start with a letter or digit and contain only letters, digits, '.', '_' or '-' (for example 1.4.0 or 2025-06-01)";

/// The name of an object in the same namespace (a DNS-1123 subdomain).
pub(crate) const OBJECT_NAME_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// `self` is an object name (see [`OBJECT_NAME_PATTERN`]).
pub(crate) fn object_name_rule() -> String {
    format!("self.matches('{OBJECT_NAME_PATTERN}')")
}

/// A Go-style duration such as 30s, 10m or 1h30m.
pub(crate) const DURATION_RULE: &str = "self.matches('^([0-9]+(ms|s|m|h))+$')";

/// Removes a type's own description from its schema. Used on enums that appear as
/// `Option<Enum>` fields: kube's `OptionalEnum` transform hoists the enum's schema over
/// the field's and would replace the field's doc comment (the `kubectl explain` text)
/// with the enum's.
pub(crate) fn without_description(schema: &mut schemars::Schema) {
    schema.remove("description");
}

/// Joins the wrapped lines of every description in `schema` into whole paragraphs.
/// Doc comments are wrapped in the source; `kubectl explain` wraps text itself and
/// keeps every hard line break it finds, which would leave ragged lines.
pub(crate) fn unwrap_descriptions(schema: &mut JSONSchemaProps) {
    if let Some(description) = &mut schema.description {
        *description = unwrap_lines(description);
    }
    for property in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        unwrap_descriptions(property);
    }
    match &mut schema.items {
        Some(JSONSchemaPropsOrArray::Schema(items)) => unwrap_descriptions(items),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => {
            items.iter_mut().for_each(unwrap_descriptions)
        }
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &mut schema.additional_properties {
        unwrap_descriptions(values);
    }
}

/// Lines within a paragraph joined by spaces; blank lines still separate paragraphs.
fn unwrap_lines(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_join_into_paragraphs() {
        assert_eq!(
            unwrap_lines("How many agents\nmay switch.\n\nDefault\n\t25%."),
            "How many agents may switch.\n\nDefault 25%."
        );
        assert_eq!(unwrap_lines("one line"), "one line");
    }
}
