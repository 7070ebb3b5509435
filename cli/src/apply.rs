//! `shoal apply`: validate locally, upload local modules, pin `oci://` tags, then publish
//! over MQTT ([`crate::mqtt`]) and wait for the hub's verdict.

use super::*;

/// The registries `oci://` references are resolved against, with the credentials given.
pub(crate) fn registries(cli: &Cli) -> shoal_registry::Registries {
    let mut config = shoal_registry::RegistryConfig {
        insecure: cli.insecure_registries.clone(),
        ..Default::default()
    };
    if let (Some(username), Some(password)) = (&cli.registry_username, &cli.registry_password) {
        // Given once for the command: it applies to whichever registry it talks to.
        config.default_credentials = Some(shoal_registry::Credentials {
            username: username.clone(),
            password: password.clone(),
        });
    }
    shoal_registry::Registries::new(config)
}

/// Reads a module file and checks that it is valid WASM; the error is the reason only.
pub(crate) fn read_module(file: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read the file: {e}"))?;
    shoal_api::model::wasm::validate(&bytes)
        .map_err(|e| format!("not a valid wasm module or component: {e}"))?;
    Ok(bytes)
}

/// Awaits `work`, with a spinner saying `what` on a terminal (nothing in scripts and pipes).
pub(crate) async fn with_spinner<T>(what: String, work: impl std::future::Future<Output = T>) -> T {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return work.await;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(what);
    bar.enable_steady_tick(Duration::from_millis(120));
    let out = work.await;
    bar.finish_and_clear();
    out
}

/// `shoal push`: validates and uploads a module, returning its digest.
pub(crate) async fn push(hub: &Hub, file: &Path) -> anyhow::Result<String> {
    let bytes = read_module(file)
        .map_err(|e| anyhow::anyhow!("module {:?}: {e}", file.display().to_string()))?;
    Ok(hub.put_blob(bytes).await?.digest)
}

pub(crate) fn report(errors: &[ManifestError]) -> anyhow::Error {
    for e in errors {
        eprintln!("error: {e}");
    }
    anyhow::anyhow!(
        "manifest rejected ({} problem{})",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    )
}

pub(crate) async fn apply(
    mqtt: &MqttTarget<'_>,
    hub: &Hub,
    registries: &shoal_registry::Registries,
    file: &Path,
    timeout: Duration,
    output: Output,
) -> anyhow::Result<()> {
    let (text, base_dir) = if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("cannot read standard input")?;
        (s, PathBuf::from("."))
    } else {
        let s = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read manifest {:?}", file.display().to_string()))?;
        (s, file.parent().map(Path::to_path_buf).unwrap_or_default())
    };
    // Validate locally first: the same checks as the hub, without a round trip.
    let stream = parse_stream(&text).map_err(|e| report(&e))?;
    let positions: Vec<(usize, String)> = stream
        .workloads
        .iter()
        .map(|(n, m)| (*n, m.metadata.name.clone()))
        .collect();
    let mut manifests: Vec<_> = stream.workloads.iter().map(|(_, m)| m.clone()).collect();
    let secrets: Vec<_> = stream.secrets.into_iter().map(|(_, s)| s).collect();
    let configs: Vec<_> = stream.configs.into_iter().map(|(_, c)| c).collect();
    let workloads = validate_all(stream.workloads).map_err(|e| report(&e))?;

    // Upload modules given as local paths; refer to them by digest. Pin `oci://` tags to the
    // digest they point at now, so every device runs the same bytes and a tag moved later
    // changes nothing until the next apply.
    let mut errors = Vec::new();
    for ((w, m), (doc, name)) in workloads.iter().zip(manifests.iter_mut()).zip(&positions) {
        let fail = |message: String| ManifestError {
            document: *doc,
            kind: None,
            workload: Some(name.clone()),
            message,
        };
        if let Some(c) = &w.container {
            // Pinned or not, learn the platforms unless the manifest lists them.
            if !c.image.is_pinned() || c.platforms.is_empty() {
                match registries.resolve_image(&c.image).await {
                    Ok((digest, platforms)) => {
                        if let Some(spec) = m.spec.container.as_mut() {
                            if !c.image.is_pinned() {
                                spec.image = c.image.pinned(digest).to_string();
                            }
                            if spec.platforms.is_empty() {
                                spec.platforms = platforms.iter().map(|p| p.to_string()).collect();
                            }
                        }
                    }
                    Err(e) => errors.push(fail(format!("spec.container.image: {e}"))),
                }
            }
        }
        if let Some(ModuleRef::Oci(r)) = &w.module {
            // Pin tags to the digest they point at now, so every device runs the same bytes
            // and a tag moved later changes nothing until the next apply.
            if !r.is_pinned() {
                match with_spinner(format!("resolving {r}"), registries.resolve(r)).await {
                    Ok(digest) => {
                        if let Some(wasm) = m.spec.wasm.as_mut() {
                            wasm.module = r.pinned(digest).to_string();
                        }
                    }
                    Err(e) => errors.push(fail(format!("spec.wasm.module: {e}"))),
                }
            }
            continue;
        }
        if let Some(ModuleRef::Path(p)) = &w.module {
            let uploaded = match read_module(&base_dir.join(p)) {
                Ok(bytes) => hub
                    .put_blob(bytes)
                    .await
                    .map(|b| b.digest)
                    .map_err(|e| format!("{e:#}")),
                Err(e) => Err(e),
            };
            match uploaded {
                Ok(digest) => {
                    if let Some(wasm) = m.spec.wasm.as_mut() {
                        wasm.module = digest;
                    }
                }
                Err(e) => errors.push(fail(format!("spec.wasm.module {p:?}: {e}"))),
            }
        }
    }
    if !errors.is_empty() {
        return Err(report(&errors));
    }
    let payload =
        to_yaml_stream(&manifests, &secrets, &configs).context("cannot encode manifest")?;
    // Secret values go over HTTPS to the hub only: on MQTT the broker (and any operator
    // subscribed to shoal/v1/apply) would see them.
    let result = if secrets.is_empty() {
        publish_apply(mqtt, payload, timeout).await?
    } else {
        hub.apply(payload).await?
    };
    if matches!(output, Output::Json | Output::Yaml) {
        emit(&result, output, |_| Table::new(&[]))?;
    }
    if !result.accepted {
        return Err(report(&result.errors));
    }
    if matches!(output, Output::Table | Output::Wide) {
        for (name, verdict) in &result.secrets {
            println!("secret/{name} {verdict}");
        }
        for (name, verdict) in &result.configs {
            println!("config/{name} {verdict}");
        }
        for (name, verdict) in &result.workloads {
            println!("workload/{name} {verdict}");
        }
    }
    Ok(())
}
