//! Where a Model's bytes come from: an http URL (with the sha256 the user declared)
//! or a key of a ConfigMap in the Model's namespace.

use super::controller::Error;
use crate::artifacts::fetch::fetch_http;
use crate::runtime::context::Context;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, ResourceExt};
use shoal_api::{ConfigMapSource, Model};

/// The source bytes and, for http sources, the digest the user declared.
pub(super) async fn fetch_source(
    model: &Model,
    ctx: &Context,
) -> Result<(Vec<u8>, Option<String>), Error> {
    if let Some(http) = &model.spec.source.http {
        let bytes = fetch_http(
            &ctx.http,
            &ctx.source_policy,
            &http.url,
            ctx.max_model_bytes,
        )
        .await?;
        return Ok((bytes, Some(http.sha256.clone())));
    }
    let Some(source) = &model.spec.source.config_map else {
        // The schema admits exactly one source and `plan` refused oci already.
        return Err(Error::Interrupted(
            "spec.source names no source this operator can fetch".into(),
        ));
    };
    Ok((config_map_bytes(ctx, model, source).await?, None))
}

/// The bytes under `source.key` of a ConfigMap in the Model's namespace: binaryData,
/// or data (text, such as a JSON Lines dataset).
pub(super) async fn config_map_bytes(
    ctx: &Context,
    model: &Model,
    source: &ConfigMapSource,
) -> Result<Vec<u8>, Error> {
    let namespace = model.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let config_map =
        config_maps
            .get_opt(&source.name)
            .await?
            .ok_or_else(|| Error::ConfigMapMissing {
                namespace: namespace.clone(),
                name: source.name.clone(),
            })?;
    let mut binary = config_map.binary_data.unwrap_or_default();
    let mut text = config_map.data.unwrap_or_default();
    if let Some(bytes) = binary.remove(&source.key) {
        return Ok(bytes.0);
    }
    if let Some(text) = text.remove(&source.key) {
        return Ok(text.into_bytes());
    }
    Err(Error::ConfigMapKeyMissing {
        namespace,
        name: source.name.clone(),
        key: source.key.clone(),
        available: binary
            .keys()
            .chain(text.keys())
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
    })
}
