//! Slow and malicious clients against a real agent process on 127.0.0.1:
//! slowloris connections, huge bodies (declared and chunked), a body sent slowly,
//! deeply nested JSON and wrong content types. Each test asserts the agent
//! answers with a clear 4xx (or closes the connection) within a bounded time,
//! keeps its memory bounded, keeps serving real inference meanwhile, and is
//! still healthy afterwards. Measured figures go to stderr (`--nocapture`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{
    Agent, RssSampler, mixed_model, model_arg, proc_status_kib, status_and_json, write_model,
};

const INFER: &str = "/v2/models/mixed/infer";
/// The agent's default `--header-read-timeout-seconds`.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How much the agent's resident memory may grow under an attack.
const RSS_GROWTH_LIMIT_KIB: u64 = 100 * 1024;

struct Fixture {
    agent: Agent,
    _dir: tempfile::TempDir,
}

/// An agent serving the tiny "mixed" model with the default limits plus `extra_args`.
fn start(extra_args: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let mixed = write_model(dir.path(), "mixed.onnx", &mixed_model());
    let mut args = vec![model_arg("mixed", &mixed)];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    Fixture {
        agent: Agent::start(&args),
        _dir: dir,
    }
}

fn mixed_request() -> Value {
    json!({
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP64", "data": [1.0, 2.0, 3.0]},
            {"name": "b", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
            {"name": "c", "shape": [1, 3], "datatype": "BOOL", "data": [true, false, true]}
        ]
    })
}

/// One real inference: 200 with the right answer.
fn assert_infers(agent: &Agent) {
    let (status, body) = status_and_json(agent.post_json(INFER, &mixed_request()));
    assert_eq!(status, 200, "inference should succeed: {body}");
    let a2 = body["outputs"]
        .as_array()
        .and_then(|outputs| outputs.iter().find(|o| o["name"] == "a2"))
        .unwrap_or_else(|| panic!("no output a2: {body}"));
    assert_eq!(a2["data"], json!([2.0, 4.0, 6.0]), "{body}");
}

/// The agent is alive, ready and infers.
fn assert_healthy(agent: &mut Agent) {
    assert!(agent.is_running(), "the agent process exited");
    assert_eq!(agent.get("/v2/health/ready").status(), 200);
    assert_infers(agent);
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A complete HTTP response in `bytes`: its status and body text; None while
/// its head or body is still incomplete.
fn parse_response(bytes: &[u8]) -> Option<(u16, String)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).to_string();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let body = bytes.get(end + 4..end + 4 + length)?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, String::from_utf8_lossy(body).to_string()))
}

/// Reads an HTTP response from `stream` (blocking, up to `timeout`): its status
/// and its body text. None if the connection closed or timed out first.
fn read_response(stream: &mut TcpStream, timeout: Duration) -> Option<(u16, String)> {
    stream
        .set_read_timeout(Some(timeout))
        .expect("set a read timeout");
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 8192];
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(response) = parse_response(&bytes) {
            return Some(response);
        }
        if Instant::now() >= deadline {
            return None;
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return None,
            Ok(read) => bytes.extend_from_slice(&buffer[..read]),
        }
    }
}

#[test]
fn slowloris_connections_are_closed_and_inference_continues() {
    let mut fixture = start(&[]);
    let agent = &mut fixture.agent;
    let pid = agent.pid();
    assert_infers(agent);
    let rss_before = proc_status_kib(pid, "VmRSS");
    let sampler = RssSampler::start(pid);

    // Each connection sends the start of a request, then one more byte of a
    // header that never ends, every second.
    const CONNECTIONS: usize = 200;
    let opened = Instant::now();
    let mut connections: Vec<(TcpStream, Option<Duration>)> = (0..CONNECTIONS)
        .map(|_| {
            let mut stream = TcpStream::connect(agent.addr()).expect("connect");
            stream
                .write_all(b"POST /v2/models/mixed/infer HTTP/1.1\r\nHost: agent\r\nX-Slow: ")
                .expect("write the start of a request");
            stream.set_nonblocking(true).expect("non-blocking");
            (stream, None)
        })
        .collect();
    let open_took = opened.elapsed();

    let mut inferences = 0;
    let mut answered = 0;
    let mut last_byte = Instant::now();
    while connections.iter().any(|(_, closed)| closed.is_none())
        && opened.elapsed() < HEADER_READ_TIMEOUT + Duration::from_secs(30)
    {
        let trickle = last_byte.elapsed() >= Duration::from_secs(1);
        if trickle {
            last_byte = Instant::now();
        }
        for (stream, closed) in connections.iter_mut().filter(|(_, c)| c.is_none()) {
            if trickle {
                match stream.write(b"a") {
                    Ok(_) => {}
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => *closed = Some(opened.elapsed()),
                }
            }
            let mut buffer = [0u8; 512];
            match stream.read(&mut buffer) {
                Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                Ok(0) | Err(_) => *closed = Some(opened.elapsed()),
                // The agent answered (an error status) instead of just closing.
                Ok(_) => {
                    answered += 1;
                    *closed = Some(opened.elapsed());
                }
            }
        }
        // Real clients keep being served meanwhile.
        assert_infers(agent);
        inferences += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let peak = sampler.stop().max(proc_status_kib(pid, "VmHWM"));

    let closed: Vec<Duration> = connections.iter().filter_map(|(_, c)| *c).collect();
    assert_eq!(
        closed.len(),
        CONNECTIONS,
        "the agent should close every slowloris connection within {:?}; {} of {CONNECTIONS} still open",
        HEADER_READ_TIMEOUT + Duration::from_secs(30),
        CONNECTIONS - closed.len()
    );
    let first = closed.iter().min().copied().unwrap_or_default();
    let last = closed.iter().max().copied().unwrap_or_default();
    eprintln!(
        "slowloris: {CONNECTIONS} connections opened in {open_took:?}, closed by the agent after \
         {first:.1?} to {last:.1?} ({answered} with a response first); {inferences} inferences \
         meanwhile, all 200; VmRSS {:.1} MiB before, peak {:.1} MiB",
        mib(rss_before),
        mib(peak)
    );
    // They were held until the header timeout, not refused for another reason…
    assert!(
        first >= HEADER_READ_TIMEOUT / 2,
        "connections closed after only {first:?}"
    );
    // …and closed soon after it.
    assert!(
        last <= open_took + HEADER_READ_TIMEOUT + Duration::from_secs(5),
        "the last slowloris connection was closed only after {last:?}"
    );
    assert!(
        peak.saturating_sub(rss_before) < RSS_GROWTH_LIMIT_KIB,
        "VmRSS grew by {:.1} MiB",
        mib(peak.saturating_sub(rss_before))
    );
    assert_healthy(agent);
}

/// Sends `head`, then streams `body_bytes` of JSON-ish filler (chunked if
/// `chunked`) from another thread while this one reads the response. Returns the
/// response (if any), how long it took, and how many body bytes were written.
fn upload(
    addr: &str,
    head: String,
    body_bytes: usize,
    chunked: bool,
) -> (Option<(u16, String)>, Duration, usize) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let mut writer = stream.try_clone().expect("clone the stream");
    writer
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("write timeout");
    let started = Instant::now();
    let sending = std::thread::spawn(move || {
        if writer.write_all(head.as_bytes()).is_err() {
            return 0;
        }
        let chunk = vec![b' '; 64 * 1024];
        let mut written = 0;
        while written < body_bytes {
            let result = if chunked {
                writer
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .and_then(|()| writer.write_all(&chunk))
                    .and_then(|()| writer.write_all(b"\r\n"))
            } else {
                writer.write_all(&chunk)
            };
            if result.is_err() {
                break; // the agent closed the connection
            }
            written += chunk.len();
        }
        if chunked && written >= body_bytes {
            let _ = writer.write_all(b"0\r\n\r\n");
        }
        written
    });
    let response = read_response(&mut stream, Duration::from_secs(60));
    let took = started.elapsed();
    let _ = stream.shutdown(Shutdown::Both);
    let written = sending.join().expect("the sending thread panicked");
    (response, took, written)
}

#[test]
fn huge_bodies_get_413_and_memory_stays_bounded() {
    let mut fixture = start(&[]);
    let agent = &mut fixture.agent;
    let pid = agent.pid();
    let addr = agent.addr();
    assert_infers(agent);
    const HUGE: usize = 64 << 20;
    let rss_before = proc_status_kib(pid, "VmRSS");
    let sampler = RssSampler::start(pid);

    // A declared length over the 16 MiB limit is refused before the body is read.
    let head = format!(
        "POST {INFER} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {HUGE}\r\n\r\n"
    );
    let (response, took, written) = upload(&addr, head, HUGE, false);
    let (status, body) = response.expect("an answer to a 64 MiB declared body");
    eprintln!(
        "declared 64 MiB body: HTTP {status} after {took:?}, {:.1} MiB sent by then: {body}",
        written as f64 / (1 << 20) as f64
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("larger than the limit"), "{body}");
    assert!(took < Duration::from_secs(10), "413 took {took:?}");

    // Chunked bodies declare no length: the agent stops reading at the limit.
    // Three at once: the memory they take is bounded by the limit each.
    let uploads: Vec<_> = (0..3)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let head = format!(
                    "POST {INFER} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                );
                upload(&addr, head, HUGE, true)
            })
        })
        .collect();
    for upload in uploads {
        let (response, took, written) = upload.join().expect("an upload thread panicked");
        let (status, body) = response.expect("an answer to a 64 MiB chunked body");
        eprintln!(
            "chunked 64 MiB body: HTTP {status} after {took:?}, {:.1} MiB sent by then",
            written as f64 / (1 << 20) as f64
        );
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("larger than the limit"), "{body}");
        assert!(took < Duration::from_secs(30), "413 took {took:?}");
    }
    // The sampler can miss a peak that lasts a few ms; VmHWM cannot.
    let peak = sampler.stop().max(proc_status_kib(pid, "VmHWM"));
    eprintln!(
        "huge bodies: VmRSS {:.1} MiB before, peak (VmHWM) {:.1} MiB, {:.1} MiB after",
        mib(rss_before),
        mib(peak),
        mib(proc_status_kib(pid, "VmRSS"))
    );
    assert!(
        peak.saturating_sub(rss_before) < RSS_GROWTH_LIMIT_KIB,
        "VmRSS grew by {:.1} MiB",
        mib(peak.saturating_sub(rss_before))
    );
    assert_healthy(agent);
}

#[test]
fn a_body_sent_slowly_gets_408() {
    // A short body read timeout keeps the test short; the default is 20 s.
    let body_timeout = Duration::from_secs(4);
    let mut fixture = start(&["--body-read-timeout-seconds", "4"]);
    let agent = &mut fixture.agent;
    assert_infers(agent);

    // Complete headers promising 1000 bytes, then a byte every half second.
    const CLIENTS: usize = 8;
    let started = Instant::now();
    let mut clients: Vec<(TcpStream, Vec<u8>, Option<Duration>)> = (0..CLIENTS)
        .map(|_| {
            let mut stream = TcpStream::connect(agent.addr()).expect("connect");
            stream
                .write_all(
                    format!(
                        "POST {INFER} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
                    )
                    .as_bytes(),
                )
                .expect("write headers");
            stream.set_nonblocking(true).expect("non-blocking");
            (stream, Vec::new(), None)
        })
        .collect();
    let mut inferences = 0;
    while clients.iter().any(|(_, _, done)| done.is_none())
        && started.elapsed() < body_timeout + Duration::from_secs(30)
    {
        for (stream, received, done) in clients.iter_mut().filter(|(_, _, d)| d.is_none()) {
            let _ = stream.write(b" ");
            let mut buffer = [0u8; 4096];
            loop {
                match stream.read(&mut buffer) {
                    Ok(0) => {
                        *done = Some(started.elapsed());
                        break;
                    }
                    Ok(read) => received.extend_from_slice(&buffer[..read]),
                    Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        *done = Some(started.elapsed());
                        break;
                    }
                }
            }
            if parse_response(received).is_some() && done.is_none() {
                *done = Some(started.elapsed());
            }
        }
        assert_infers(agent);
        inferences += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    for (_, received, done) in &clients {
        let done = done.expect("a slow body was never answered or cut off");
        let (status, body) = parse_response(received).unwrap_or_else(|| {
            panic!(
                "a body that does not arrive in time gets an answer, not just a closed connection: {:?}",
                String::from_utf8_lossy(received)
            )
        });
        eprintln!("slow body: answered after {done:.1?}: {status} {body}");
        assert_eq!(
            status, 408,
            "a body that does not arrive in time gets 408: {body}"
        );
        assert!(body.contains("did not arrive within"), "{body}");
        assert!(
            done >= body_timeout / 2 && done <= body_timeout + Duration::from_secs(10),
            "answered after {done:?}"
        );
    }
    eprintln!("slow bodies: {inferences} inferences meanwhile, all 200");
    assert_healthy(agent);
}

/// Posts raw bytes; returns the status and the `error` text.
fn refused(agent: &Agent, content_type: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let started = Instant::now();
    let (status, json) = status_and_json(agent.post_raw(INFER, content_type, body));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        started.elapsed()
    );
    let error = json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error text: {json}"))
        .to_string();
    (status, error)
}

#[test]
fn deep_json_nesting_gets_400_with_a_reason() {
    let mut fixture = start(&[]);
    let agent = &mut fixture.agent;
    const DEPTH: usize = 100_000;
    let json = Some("application/json");

    // The whole body: an InferRequest cannot be an array.
    let body = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let (status, error) = refused(agent, json, body.into_bytes());
    eprintln!("{DEPTH} nested arrays as the body: {status} {error}");
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("not a valid inference request"), "{error}");

    // Inside a tensor's data, which accepts nested arrays.
    let body = format!(
        r#"{{"inputs":[{{"name":"a","shape":[1,3],"datatype":"FP64","data":{}{}}}]}}"#,
        "[".repeat(DEPTH),
        "]".repeat(DEPTH)
    );
    let (status, error) = refused(agent, json, body.into_bytes());
    eprintln!("{DEPTH} nested arrays in data: {status} {error}");
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("recursion limit"), "{error}");

    // Inside parameters, which accept any JSON: nested objects.
    let body = format!(
        r#"{{"parameters":{{"p":{}1{}}},"inputs":[]}}"#,
        r#"{"a":"#.repeat(DEPTH),
        "}".repeat(DEPTH)
    );
    let (status, error) = refused(agent, json, body.into_bytes());
    eprintln!("{DEPTH} nested objects in parameters: {status} {error}");
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("recursion limit"), "{error}");

    // Unterminated nesting, as a truncated or malicious body would be.
    let (status, error) = refused(agent, json, "[".repeat(DEPTH).into_bytes());
    assert_eq!(status, 400, "{error}");

    assert_healthy(agent);
}

#[test]
fn wrong_content_types_get_400_with_a_reason() {
    let mut fixture = start(&[]);
    let agent = &mut fixture.agent;
    let body = mixed_request().to_string().into_bytes();
    // The agent answers 400 (not 415), as KServe and Triton do, naming the type.
    for content_type in [
        "text/plain",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/jsonx",
        "application/xml",
    ] {
        let (status, error) = refused(agent, Some(content_type), body.clone());
        assert_eq!(status, 400, "{content_type}: {error}");
        assert!(
            error.contains("unsupported content type") && error.contains(content_type),
            "{content_type}: {error}"
        );
    }
    // Triton's binary tensor extension.
    let response = agent
        .client
        .post(agent.url(INFER))
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", "12")
        .body(body.clone())
        .send()
        .expect("POST");
    let (status, json) = status_and_json(response);
    assert_eq!(status, 400, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap_or("")
            .contains("binary_data=False"),
        "{json}"
    );
    // Declared JSON that is not JSON, nor even UTF-8.
    let (status, error) = refused(
        agent,
        Some("application/json"),
        vec![0xff, 0xfe, 0x00, 0x7b],
    );
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("not a valid inference request"), "{error}");
    // A non-UTF-8 content type.
    let mut stream = TcpStream::connect(agent.addr()).expect("connect");
    let mut request =
        format!("POST {INFER} HTTP/1.1\r\nHost: agent\r\nContent-Type: ").into_bytes();
    request.extend_from_slice(&[0xff, 0xfe]);
    request.extend_from_slice(format!("\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    request.extend_from_slice(&body);
    stream.write_all(&request).expect("write");
    let (status, text) = read_response(&mut stream, Duration::from_secs(10)).expect("an answer");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("unsupported content type"), "{text}");

    assert_healthy(agent);
}
