//! The HTTP server: Open Inference Protocol v2 REST routes (health, metadata,
//! infer), `/metrics`, and the mapping of every failure to a status code and a
//! JSON `{"error": ...}` body, the way KServe and Triton answer.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;

use crate::admission::{Admission, Closed};
use crate::engine::{InferError, LoadedModel};
use crate::metrics::Metrics;
use crate::oip::{
    ErrorBody, InferRequest, InferResponse, MetadataTensor, ModelMetadata, ServerMetadata,
};
use crate::registry::ModelRegistry;
use crate::validation::{InvalidRequest, ShapeLimits, validate};

/// Limits on inference work; see `main.rs` for the defaults and why.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests running inference at once.
    pub workers: usize,
    /// Requests waiting for a worker before new ones get 429.
    pub queue: usize,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest batch (an open first dimension) a request may have; larger ones get 400.
    pub max_batch: usize,
    /// From receiving a request to answering it, queueing included.
    pub request_timeout: Duration,
    /// From a request's headers to the end of its body; a client slower than
    /// that (a stalled or trickling body) gets 408 and frees its queue slot.
    /// Only matters when shorter than `request_timeout`.
    pub body_read_timeout: Duration,
    /// From a connection's first byte (or the end of its previous request) to
    /// the end of the request headers; past it the connection is closed. Without
    /// it a slowloris client holds a connection and its task forever.
    pub header_read_timeout: Duration,
}

#[derive(Clone)]
pub struct AppState {
    registry: Arc<ModelRegistry>,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    limits: Limits,
}

impl AppState {
    pub fn new(registry: Arc<ModelRegistry>, metrics: Arc<Metrics>, limits: Limits) -> AppState {
        let admission = Arc::new(Admission::new(
            limits.workers,
            limits.queue,
            metrics.clone(),
        ));
        AppState {
            registry,
            metrics,
            admission,
            limits,
        }
    }
}

/// Everything a request can get instead of a 200.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("model \"{0}\" is not served here")]
    UnknownModel(String),
    #[error("model \"{name}\" has no version \"{version}\" here (serving version \"{serving}\")")]
    UnknownVersion {
        name: String,
        version: String,
        serving: String,
    },
    #[error("no such route: {0}")]
    NoRoute(String),
    #[error("unsupported content type \"{0}\": send the request as application/json")]
    ContentType(String),
    #[error(
        "the binary tensor data extension is not supported; send JSON data (tritonclient: binary_data=False)"
    )]
    BinaryExtension,
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body is not a valid inference request: {0}")]
    BadJson(String),
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("too many requests are queued for inference; retry shortly")]
    QueueFull,
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Inference(#[from] InferError),
    #[error("the inference worker failed: {0}")]
    Worker(String),
    #[error("could not encode the response: {0}")]
    Encode(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownModel(_) | ApiError::UnknownVersion { .. } | ApiError::NoRoute(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::ContentType(_)
            | ApiError::BinaryExtension
            | ApiError::BodyRead(_)
            | ApiError::BadJson(_)
            | ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Inference(_) | ApiError::Worker(_) | ApiError::Encode(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl From<Closed> for ApiError {
    fn from(_: Closed) -> Self {
        ApiError::ShuttingDown
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        // Overload is brief by nature; tell clients when to come back.
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(versioned_model_metadata),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(versioned_model_ready),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(versioned_infer),
        )
        .route("/metrics", get(metrics))
        .fallback(|uri: axum::http::Uri| async move { ApiError::NoRoute(uri.path().to_string()) })
        .with_state(state)
}

/// Serves HTTP/1.1 until `shutdown` completes, then lets requests in flight
/// finish. Not `axum::serve`: it gives hyper no timer, so hyper's header read
/// timeout never fires and a client trickling a header (slowloris) would keep
/// its connection forever.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let header_read_timeout = state.limits.header_read_timeout;
    let app = router(state);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

/// Ready once a model serves, or when the agent knows it has none to serve (see
/// [`ModelRegistry::ready`]); the agent DaemonSet's readiness probe. Before that
/// every inference would fail.
async fn ready(State(state): State<AppState>) -> Response {
    if state.registry.ready() {
        Json(json!({ "ready": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false })),
        )
            .into_response()
    }
}

async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "shoal-agent",
        version: env!("CARGO_PKG_VERSION"),
        extensions: Vec::new(),
    })
}

fn find_model(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<LoadedModel>, ApiError> {
    let model = state
        .registry
        .get(name)
        .ok_or_else(|| ApiError::UnknownModel(name.to_string()))?;
    match version {
        Some(version) if version != model.version => Err(ApiError::UnknownVersion {
            name: name.to_string(),
            version: version.to_string(),
            serving: model.version.clone(),
        }),
        _ => Ok(model),
    }
}

fn metadata_of(model: &LoadedModel) -> ModelMetadata {
    ModelMetadata {
        name: model.name.clone(),
        versions: vec![model.version.clone()],
        platform: "onnx",
        inputs: model
            .signature
            .inputs
            .iter()
            .map(MetadataTensor::from)
            .collect(),
        outputs: model
            .signature
            .outputs
            .iter()
            .map(MetadataTensor::from)
            .collect(),
    }
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    let model = find_model(&state, &name, None)?;
    Ok(Json(metadata_of(&model)))
}

async fn versioned_model_metadata(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, ApiError> {
    let model = find_model(&state, &name, Some(&version))?;
    Ok(Json(metadata_of(&model)))
}

/// A model is ready as soon as it is in the registry: it was warmed up before
/// it was swapped in.
fn readiness(model: &LoadedModel) -> Json<serde_json::Value> {
    Json(json!({ "name": model.name, "ready": true }))
}

async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = find_model(&state, &name, None)?;
    Ok(readiness(&model))
}

async fn versioned_model_ready(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = find_model(&state, &name, Some(&version))?;
    Ok(readiness(&model))
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => ApiError::Encode(err.to_string()).into_response(),
    }
}

async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_and_record(state, name, None, headers, body).await
}

async fn versioned_infer(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_and_record(state, name, Some(version), headers, body).await
}

async fn infer_and_record(
    state: AppState,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let model = match find_model(&state, &name, version.as_deref()) {
        Ok(model) => model,
        Err(err) => {
            state.metrics.record_unknown_model(err.status().as_u16());
            return err.into_response();
        }
    };
    let response = match infer_on(&state, &model, &headers, body).await {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(err) => {
            if err.status().is_server_error() {
                tracing::warn!(model = %model.name, version = %model.version, error = %err, "inference request failed");
            }
            err.into_response()
        }
    };
    state.metrics.record_request(
        &model.name,
        &model.version,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn infer_on(
    state: &AppState,
    model: &Arc<LoadedModel>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<u8>, ApiError> {
    check_content_type(headers)?;
    let limit = state.limits.max_body_bytes;
    if declared_length(headers).is_some_and(|length| length > limit) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let timeout = state.limits.request_timeout;
    let body_timeout = state.limits.body_read_timeout;
    let Some(slot) = state.admission.try_admit() else {
        // Read the rest of the body, keeping none of it, before answering 429: a
        // connection closed with request bytes unread is reset by the kernel, and
        // the client may then lose the answer and see a broken connection.
        let _ = tokio::time::timeout(body_timeout, discard_body(body, limit)).await;
        return Err(ApiError::QueueFull);
    };
    let work = async {
        let bytes = tokio::time::timeout(body_timeout, read_body(body, limit))
            .await
            .map_err(|_| ApiError::BodyTimeout(body_timeout))??;
        let running = state.admission.run(slot).await?;
        let model = model.clone();
        let shape_limits = ShapeLimits::new(state.limits.max_batch, limit);
        // Parsing a large body is CPU work too, so it runs on the worker with
        // the inference. The worker owns the admission until it is done, even
        // when the client is gone.
        tokio::task::spawn_blocking(move || {
            let _running = running;
            infer_blocking(&model, &bytes, shape_limits)
        })
        .await
        .map_err(|err| ApiError::Worker(err.to_string()))?
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ApiError::Timeout(timeout))?
}

fn infer_blocking(
    model: &LoadedModel,
    body: &[u8],
    shape_limits: ShapeLimits,
) -> Result<Vec<u8>, ApiError> {
    let request: InferRequest =
        serde_json::from_slice(body).map_err(|err| ApiError::BadJson(err.to_string()))?;
    let valid = validate(&model.signature, request, shape_limits)?;
    let outputs = model.infer(&valid)?;
    let response = InferResponse {
        model_name: model.name.clone(),
        model_version: model.version.clone(),
        id: valid.id,
        outputs,
    };
    serde_json::to_vec(&response).map_err(|err| ApiError::Encode(err.to_string()))
}

/// JSON, or no content type at all: some clients (tritonclient's HTTP client
/// among them) send JSON bodies without one.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key("inference-header-content-length") {
        return Err(ApiError::BinaryExtension);
    }
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("");
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::ContentType(text.to_string()))
    }
}

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Reads the body, refusing it as soon as it grows past `limit` (a chunked body
/// declares no length up front).
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| ApiError::BodyRead(err.to_string()))?;
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::BodyTooLarge { limit });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Reads a body to its end, or up to `limit` bytes, holding one chunk at a time.
async fn discard_body(body: Body, limit: usize) {
    let mut stream = body.into_data_stream();
    let mut read = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        read += chunk.len();
        if read > limit {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn json_or_no_content_type_is_accepted() {
        assert!(check_content_type(&headers(&[])).is_ok());
        assert!(check_content_type(&headers(&[("content-type", "application/json")])).is_ok());
        assert!(
            check_content_type(&headers(&[(
                "content-type",
                "Application/JSON; charset=utf-8"
            )]))
            .is_ok()
        );
    }

    #[test]
    fn other_content_types_are_refused() {
        let err =
            check_content_type(&headers(&[("content-type", "text/plain")])).expect_err("refused");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert!(err.to_string().contains("\"text/plain\""), "{err}");
        let err = check_content_type(&headers(&[("inference-header-content-length", "12")]))
            .expect_err("refused");
        assert!(matches!(err, ApiError::BinaryExtension));
    }

    #[test]
    fn overload_statuses() {
        assert_eq!(ApiError::QueueFull.status(), StatusCode::TOO_MANY_REQUESTS);
        let response = ApiError::QueueFull.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            ApiError::BodyTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            ApiError::BodyTimeout(Duration::from_secs(1)).status(),
            StatusCode::REQUEST_TIMEOUT
        );
    }
}
