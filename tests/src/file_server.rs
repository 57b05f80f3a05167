//! A local HTTP server for a model file, the `http` source of a Model.

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
