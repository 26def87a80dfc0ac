//! What the sim's test binaries share.

use std::collections::HashMap;

use fleet_e2e::temp_dir;
use ollama_sim::{App, Config};

/// Starts a sim with fast defaults plus `vars`; returns its base URL.
pub async fn start(tag: &str, vars: &[(&str, &str)]) -> String {
    let dir = temp_dir(tag);
    let mut env: HashMap<String, String> = [
        ("OLLAMA_MODELS", dir.to_str().expect("utf-8")),
        ("SIM_PULL_TIME", "50ms"),
        ("SIM_LOAD_TIME", "20ms"),
        ("SIM_MODEL_SIZE", "2Mi"),
        ("SIM_TOKENS_PER_SECOND", "1000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let cfg = Config::from_vars(&env).expect("config");
    let app = App::new(cfg);
    ollama_sim::start_background(&app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(ollama_sim::serve(app, listener, std::future::pending()));
    url
}
