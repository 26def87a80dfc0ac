//! Client-side image pull into containerd (works on 1.6, which has no Transfer service):
//! registry (through `oci-client`) → containerd's content store → unpacked through the diff
//! service into snapshots named by chain ID, with the labels containerd's own pull sets, all
//! under a lease so garbage collection cannot take a half-done pull.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AbortRequest, ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, Image, InfoRequest, UpdateImageRequest,
    UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::Value;
use tonic::{Code, Request};

use crate::containerd::Containerd;
use crate::registry::RegistryOptions;
use crate::{ImageInfo, PullProgress, Result, RuntimeError, image};

const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

const CHUNK: usize = 1 << 20;

fn failed(op: &'static str, id: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Failed {
        op,
        id: id.to_string(),
        message: e.to_string(),
    }
}

fn registry_error(image: &str, e: oci_client::errors::OciDistributionError) -> RuntimeError {
    RuntimeError::Failed {
        op: "pull",
        id: image.to_string(),
        message: format!("registry: {e}"),
    }
}

/// The registry client and reference for a normalised image name.
fn client_for(name: &str, opts: &RegistryOptions) -> Result<(Client, Reference, RegistryAuth)> {
    let parsed = fleet_api::ImageRef::parse(name).map_err(|e| failed("pull", name, e))?;
    let source = opts.source(&parsed.domain);
    let reference = match (&parsed.digest, &parsed.tag) {
        (Some(d), _) => Reference::with_digest(source.host.clone(), parsed.path.clone(), d.clone()),
        (None, Some(t)) => Reference::with_tag(source.host.clone(), parsed.path.clone(), t.clone()),
        (None, None) => {
            Reference::with_tag(source.host.clone(), parsed.path.clone(), "latest".into())
        }
    };
    let protocol = if source.insecure {
        ClientProtocol::HttpsExcept(vec![source.host.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..ClientConfig::default()
    });
    let auth = source
        .auth
        .map_or(RegistryAuth::Anonymous, |(u, p)| RegistryAuth::Basic(u, p));
    Ok((client, reference, auth))
}

/// The digest the registry serves for `name`'s tag now (for `imagePullPolicy: Always`).
pub async fn resolve(name: &str, opts: &RegistryOptions) -> Result<String> {
    let (client, reference, auth) = client_for(name, opts)?;
    let (_, digest) = client
        .pull_manifest_raw(&reference, &auth, &MANIFEST_TYPES)
        .await
        .map_err(|e| registry_error(name, e))?;
    Ok(digest)
}

impl Containerd {
    fn req_in<T>(&self, msg: T, lease: &str) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(ns) = self.namespace().parse() {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        if let Ok(l) = lease.parse() {
            req.metadata_mut().insert("containerd-lease", l);
        }
        req
    }

    async fn content_exists(&self, digest: &str) -> Result<bool> {
        let mut c = ContentClient::new(self.channel());
        match c
            .info(self.req_in(
                InfoRequest {
                    digest: digest.into(),
                },
                "",
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(failed("content info", digest, s.message())),
        }
    }

    /// Sets labels on existing content (a blob present from an earlier pull).
    async fn label_content(&self, digest: &str, labels: &HashMap<String, String>) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let mut c = ContentClient::new(self.channel());
        let info = containerd_client::services::v1::Info {
            digest: digest.into(),
            labels: labels.clone(),
            ..Default::default()
        };
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        c.update(self.req_in(
            UpdateContentRequest {
                info: Some(info),
                update_mask: Some(prost_types::FieldMask { paths }),
            },
            "",
        ))
        .await
        .map_err(|s| failed("label content", digest, s.message()))?;
        Ok(())
    }

    /// Writes a blob from a stream of chunks into the content store, committing it with
    /// `labels`; containerd checks the digest and size.
    async fn write_blob(
        &self,
        lease: &str,
        digest: &str,
        size: i64,
        labels: HashMap<String, String>,
        mut chunks: impl futures::Stream<Item = std::result::Result<bytes::Bytes, String>> + Unpin,
        progress: &PullProgress,
    ) -> Result<()> {
        let write_ref = format!("ollama-fleet-pull-{digest}");
        // Abort what an earlier, interrupted write left under this ref.
        let mut c = ContentClient::new(self.channel());
        let _ = c
            .abort(self.req_in(
                AbortRequest {
                    r#ref: write_ref.clone(),
                },
                lease,
            ))
            .await;

        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        // containerd answers (and sends its response headers) only once it has a request, so
        // the first one, a STAT that opens the write, is queued before the stream is opened.
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: write_ref.clone(),
            total: size,
            expected: digest.into(),
            ..Default::default()
        };
        tx.send(stat)
            .await
            .map_err(|_| failed("write content", digest, "closed"))?;
        let requests =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut responses = c
            .write(self.req_in(requests, lease))
            .await
            .map_err(|s| failed("write content", digest, s.message()))?
            .into_inner();
        responses
            .message()
            .await
            .map_err(|s| failed("write content", digest, s.message()))?
            .ok_or_else(|| failed("write content", digest, "stream ended"))?;
        // Chunks are sent without waiting for each answer; a reader drains the answers
        // alongside, and the commit's answer (the last) says whether the blob made it.
        let writer = async move {
            let mut offset: i64 = 0;
            let mut buffer: Vec<u8> = Vec::with_capacity(CHUNK);
            let message =
                |data: Vec<u8>,
                 action: WriteAction,
                 offset: i64,
                 labels: HashMap<String, String>| WriteContentRequest {
                    action: action as i32,
                    r#ref: write_ref.clone(),
                    total: size,
                    expected: digest.into(),
                    offset,
                    data,
                    labels,
                };
            let closed = || failed("write content", digest, "containerd closed the write");
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| failed("download", digest, e))?;
                buffer.extend_from_slice(&chunk);
                if buffer.len() >= CHUNK {
                    let data = std::mem::replace(&mut buffer, Vec::with_capacity(CHUNK));
                    let len = data.len() as i64;
                    tx.send(message(data, WriteAction::Write, offset, HashMap::new()))
                        .await
                        .map_err(|_| closed())?;
                    offset += len;
                    progress.add_done(len as u64);
                }
            }
            if !buffer.is_empty() {
                let len = buffer.len() as i64;
                tx.send(message(buffer, WriteAction::Write, offset, HashMap::new()))
                    .await
                    .map_err(|_| closed())?;
                offset += len;
                progress.add_done(len as u64);
            }
            tx.send(message(Vec::new(), WriteAction::Commit, offset, labels))
                .await
                .map_err(|_| closed())?;
            // Closing the request stream ends the call once containerd has answered everything.
            drop(tx);
            Ok::<(), RuntimeError>(())
        };
        let reader = async {
            loop {
                match responses.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                    Err(s) => return Err(failed("write content", digest, s.message())),
                }
            }
        };
        let (written, answered) = tokio::join!(writer, reader);
        // containerd's answer explains a closed stream better than the writer can.
        answered?;
        written
    }

    /// Pulls `name` (normalised) and unpacks it for the snapshotter; returns the image as
    /// [`crate::Runtime::image`] would.
    pub async fn pull_with(
        &self,
        name: &str,
        opts: &RegistryOptions,
        progress: &PullProgress,
    ) -> Result<ImageInfo> {
        let (client, reference, auth) = client_for(name, opts)?;
        let (top_bytes, top_digest) = client
            .pull_manifest_raw(&reference, &auth, &MANIFEST_TYPES)
            .await
            .map_err(|e| registry_error(name, e))?;
        let top: Value = serde_json::from_slice(&top_bytes).map_err(|e| failed("pull", name, e))?;
        let top_media = top["mediaType"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                if top["manifests"].is_array() {
                    MANIFEST_TYPES[0].into()
                } else {
                    MANIFEST_TYPES[2].into()
                }
            });
        let (manifest_bytes, manifest_digest) =
            if image::is_index(&top_media) || top["manifests"].is_array() {
                let d = image::pick_manifest(&top, "amd64")
                    .ok_or_else(|| failed("pull", name, "no linux/amd64 manifest in the index"))?;
                let by_digest = Reference::with_digest(
                    reference.registry().into(),
                    reference.repository().into(),
                    d.clone(),
                );
                let (bytes, _) = client
                    .pull_manifest_raw(&by_digest, &auth, &MANIFEST_TYPES)
                    .await
                    .map_err(|e| registry_error(name, e))?;
                (bytes, d)
            } else {
                (top_bytes.clone(), top_digest.clone())
            };
        let manifest: Value =
            serde_json::from_slice(&manifest_bytes).map_err(|e| failed("pull", name, e))?;
        let manifest_media = manifest["mediaType"]
            .as_str()
            .unwrap_or(MANIFEST_TYPES[2])
            .to_string();
        let config_desc = &manifest["config"];
        let config_digest = config_desc["digest"]
            .as_str()
            .ok_or_else(|| failed("pull", name, "manifest has no config"))?
            .to_string();
        let layers: Vec<(String, String, i64)> = manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                (
                    l["digest"].as_str().unwrap_or("").to_string(),
                    l["mediaType"].as_str().unwrap_or("").to_string(),
                    l["size"].as_i64().unwrap_or(0),
                )
            })
            .collect();

        // The config first: it names the diff IDs, hence the chain IDs.
        let by_digest = |d: &str| {
            Reference::with_digest(
                reference.registry().into(),
                reference.repository().into(),
                d.into(),
            )
        };
        let mut config_bytes = Vec::new();
        client
            .pull_blob(
                &by_digest(&config_digest),
                &config_desc_for(&config_digest, config_desc),
                &mut config_bytes,
            )
            .await
            .map_err(|e| registry_error(name, e))?;
        let config: Value =
            serde_json::from_slice(&config_bytes).map_err(|e| failed("pull", name, e))?;
        let (image_config, diff_ids) = image::parse_config(&config);
        if diff_ids.len() != layers.len() {
            return Err(failed(
                "pull",
                name,
                "the config's diff IDs do not match the manifest's layers",
            ));
        }
        let chain_ids: Vec<String> = (1..=diff_ids.len())
            .map(|n| image::chain_id(&diff_ids[..n]).unwrap_or_default())
            .collect();
        let top_chain = chain_ids
            .last()
            .cloned()
            .ok_or_else(|| failed("pull", name, "image has no layers"))?;

        // Everything from here on is held by a lease.
        let mut leases = LeasesClient::new(self.channel());
        let expire =
            humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
                .to_string();
        let lease = leases
            .create(self.req_in(
                CreateLeaseRequest {
                    id: format!("ollama-fleet-pull-{}", manifest_digest.replace(':', "-")),
                    labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
                },
                "",
            ))
            .await
            .map(|r| r.into_inner().lease.map(|l| l.id).unwrap_or_default())
            .unwrap_or_else(|_| format!("ollama-fleet-pull-{}", manifest_digest.replace(':', "-")));
        let result = self
            .pull_leased(PullPlan {
                name,
                client: &client,
                reference: &reference,
                top: (&top_media, &top_digest, &top_bytes),
                manifest: (&manifest_media, &manifest_digest, &manifest_bytes),
                config: (&config_digest, &config_bytes),
                layers: &layers,
                diff_ids: &diff_ids,
                chain_ids: &chain_ids,
                lease: &lease,
                progress,
            })
            .await;
        let _ = leases
            .delete(self.req_in(
                DeleteLeaseRequest {
                    id: lease,
                    sync: false,
                },
                "",
            ))
            .await;
        result?;
        Ok(ImageInfo {
            name: name.into(),
            digest: top_digest,
            chain_id: top_chain,
            config: image_config,
        })
    }

    async fn pull_leased(&self, p: PullPlan<'_>) -> Result<()> {
        let layers_to_fetch: Vec<usize> = {
            let mut v = Vec::new();
            for (i, (digest, _, _)) in p.layers.iter().enumerate() {
                if !self.content_exists(digest).await? {
                    v.push(i);
                }
            }
            v
        };
        let total: i64 = layers_to_fetch.iter().map(|i| p.layers[*i].2).sum();
        p.progress.set_total(u64::try_from(total).unwrap_or(0));

        // Layers are fetched two at a time while the unpacker applies them in order as soon as
        // the next one has arrived (as containerd's own client does): download and unpack overlap.
        let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let present: Vec<usize> = (0..p.layers.len())
            .filter(|i| !layers_to_fetch.contains(i))
            .collect();
        for i in present {
            let _ = arrived_tx.send(i);
        }
        let fetcher = async {
            let mut fetches = futures::stream::iter(layers_to_fetch.into_iter().map(|i| {
                let (digest, media, size) = p.layers[i].clone();
                let labels = HashMap::from([(
                    "containerd.io/uncompressed".to_string(),
                    p.diff_ids[i].clone(),
                )]);
                async move {
                    let desc = oci_client::manifest::OciDescriptor {
                        media_type: media,
                        digest: digest.clone(),
                        size,
                        ..Default::default()
                    };
                    let by_digest = Reference::with_digest(
                        p.reference.registry().into(),
                        p.reference.repository().into(),
                        digest.clone(),
                    );
                    // A ranged request from byte 0: the registry's stream is not hashed a second
                    // time here, because containerd verifies every blob against its digest when it
                    // is committed (a mismatch fails the commit). A registry that ignores ranges
                    // answers 200, and oci-client verifies that stream itself.
                    let response = p
                        .client
                        .pull_blob_stream_partial(&by_digest, &desc, 0, None)
                        .await
                        .map_err(|e| registry_error(p.name, e))?;
                    let stream = match response {
                        oci_client::client::BlobResponse::Full(s)
                        | oci_client::client::BlobResponse::Partial(s) => s,
                    };
                    let chunks = stream.stream.map(|r| r.map_err(|e| e.to_string()));
                    self.write_blob(p.lease, &digest, size, labels, Box::pin(chunks), p.progress)
                        .await
                        .map(|()| i)
                }
            }))
            .buffer_unordered(2);
            while let Some(done) = fetches.next().await {
                let _ = arrived_tx.send(done?);
            }
            drop(arrived_tx);
            Ok::<(), RuntimeError>(())
        };
        let unpacker = async {
            let mut arrived = vec![false; p.layers.len()];
            let mut next = 0;
            let mut parent = String::new();
            while next < p.layers.len() {
                let Some(i) = arrived_rx.recv().await else {
                    // The fetcher stopped early; its error is the one to report.
                    return Ok(());
                };
                arrived[i] = true;
                while next < p.layers.len() && arrived[next] {
                    let chain = &p.chain_ids[next];
                    self.unpack_layer(p.lease, &p.layers[next], &p.diff_ids[next], chain, &parent)
                        .await?;
                    parent = chain.clone();
                    next += 1;
                }
            }
            Ok::<(), RuntimeError>(())
        };
        let (fetched, unpacked) = tokio::join!(fetcher, unpacker);
        fetched?;
        unpacked?;

        // Config, manifest and index, labelled so that garbage collection keeps what they use.
        let config_labels = HashMap::from([(
            "containerd.io/gc.ref.snapshot.overlayfs".to_string(),
            p.chain_ids.last().cloned().unwrap_or_default(),
        )]);
        self.put_small(p.lease, p.config.0, p.config.1, config_labels)
            .await?;
        let mut manifest_labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            p.config.0.to_string(),
        )]);
        for (i, (digest, _, _)) in p.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                digest.clone(),
            );
        }
        self.put_small(p.lease, p.manifest.1, p.manifest.2, manifest_labels)
            .await?;
        if p.top.1 != p.manifest.1 {
            let index_labels = HashMap::from([(
                "containerd.io/gc.ref.content.m.0".to_string(),
                p.manifest.1.to_string(),
            )]);
            self.put_small(p.lease, p.top.1, p.top.2, index_labels)
                .await?;
        }

        // The image record.
        let target = Descriptor {
            media_type: p.top.0.to_string(),
            digest: p.top.1.to_string(),
            size: p.top.2.len() as i64,
            annotations: HashMap::new(),
        };
        let record = Image {
            name: p.name.into(),
            target: Some(target),
            ..Default::default()
        };
        let mut images = ImagesClient::new(self.channel());
        match images
            .create(self.req_in(
                CreateImageRequest {
                    image: Some(record.clone()),
                    source_date_epoch: None,
                },
                p.lease,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => images
                .update(self.req_in(
                    UpdateImageRequest {
                        image: Some(record),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into()],
                        }),
                        source_date_epoch: None,
                    },
                    p.lease,
                ))
                .await
                .map(|_| ())
                .map_err(|s| failed("update image", p.name, s.message())),
            Err(s) => Err(failed("create image", p.name, s.message())),
        }
    }

    /// Stores a small blob we already hold (manifest, config, index) with its labels.
    async fn put_small(
        &self,
        lease: &str,
        digest: &str,
        bytes: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if self.content_exists(digest).await? {
            return self.label_content(digest, &labels).await;
        }
        let data = bytes::Bytes::copy_from_slice(bytes);
        let chunks = futures::stream::iter([Ok(data)]);
        self.write_blob(
            lease,
            digest,
            bytes.len() as i64,
            labels,
            chunks,
            &PullProgress::default(),
        )
        .await
    }

    async fn unpack_layer(
        &self,
        lease: &str,
        layer: &(String, String, i64),
        diff_id: &str,
        chain: &str,
        parent: &str,
    ) -> Result<()> {
        let snapshotter = "overlayfs".to_string();
        let mut snapshots = SnapshotsClient::new(self.channel());
        let exists = snapshots
            .stat(self.req_in(
                StatSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: chain.into(),
                },
                lease,
            ))
            .await
            .is_ok();
        if exists {
            return Ok(());
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let key = format!("extract-{nanos}-{chain}");
        let mounts = snapshots
            .prepare(self.req_in(
                PrepareSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.into(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
            .map_err(|s| failed("prepare snapshot", chain, s.message()))?
            .into_inner()
            .mounts;
        let mut diff = DiffClient::new(self.channel());
        let applied = diff
            .apply(self.req_in(
                ApplyRequest {
                    diff: Some(Descriptor {
                        media_type: layer.1.clone(),
                        digest: layer.0.clone(),
                        size: layer.2,
                        annotations: HashMap::new(),
                    }),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                },
                lease,
            ))
            .await;
        let remove = |snapshots: &mut SnapshotsClient<tonic::transport::Channel>| {
            let req = self.req_in(
                RemoveSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: key.clone(),
                },
                lease,
            );
            let mut s = snapshots.clone();
            async move {
                let _ = s.remove(req).await;
            }
        };
        let applied = match applied {
            Ok(r) => r.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
            Err(s) => {
                remove(&mut snapshots).await;
                return Err(failed("apply layer", &layer.0, s.message()));
            }
        };
        if applied != diff_id {
            remove(&mut snapshots).await;
            return Err(failed(
                "apply layer",
                &layer.0,
                format!("uncompressed digest {applied} does not match the config's {diff_id}"),
            ));
        }
        match snapshots
            .commit(self.req_in(
                CommitSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    name: chain.into(),
                    key: key.clone(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                remove(&mut snapshots).await;
                Ok(())
            }
            Err(s) => Err(failed("commit snapshot", chain, s.message())),
        }
    }
}

fn config_desc_for(digest: &str, desc: &Value) -> oci_client::manifest::OciDescriptor {
    oci_client::manifest::OciDescriptor {
        media_type: desc["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.config.v1+json")
            .into(),
        digest: digest.into(),
        size: desc["size"].as_i64().unwrap_or(0),
        ..Default::default()
    }
}

/// Everything one pull needs once the manifest and config are known.
struct PullPlan<'a> {
    name: &'a str,
    client: &'a Client,
    reference: &'a Reference,
    top: (&'a str, &'a str, &'a bytes::Bytes),
    manifest: (&'a str, &'a str, &'a [u8]),
    config: (&'a str, &'a [u8]),
    layers: &'a [(String, String, i64)],
    diff_ids: &'a [String],
    chain_ids: &'a [String],
    lease: &'a str,
    progress: &'a PullProgress,
}
