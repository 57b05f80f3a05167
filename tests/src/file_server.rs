//! Local HTTP servers for the `http` source of a Model: a model file, and a
//! redirect to somewhere else that counts nothing but the redirect.

/// Serves `bytes` at `http://127.0.0.1:<port>/model.onnx` until the handle is
/// aborted or the test's runtime ends. Returns the URL and the server task.
pub async fn serve_file(bytes: Vec<u8>) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let body = axum::body::Bytes::from(bytes);
    let app = axum::Router::new().route(
        "/model.onnx",
        axum::routing::get(move || async move { body.clone() }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/model.onnx", listener.local_addr()?);
    let handle = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("the test's file server stopped: {err}");
        }
    });
    Ok((url, handle))
}

/// Answers every request on `http://<ip>:<port>/model.onnx` with `302 Found` to
/// `location` (bind any 127/8 address: Linux answers on all of them). Returns the URL
/// and the server task.
pub async fn serve_redirect(
    ip: &str,
    location: String,
) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let app = axum::Router::new().route(
        "/model.onnx",
        axum::routing::get(move || async move {
            (
                axum::http::StatusCode::FOUND,
                [(axum::http::header::LOCATION, location.clone())],
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let url = format!("http://{}/model.onnx", listener.local_addr()?);
    let handle = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("the test's redirecting server stopped: {err}");
        }
    });
    Ok((url, handle))
}
