//! Images: a pinned image is pulled client-side for this device's platform through
//! [`shoal_registry`] (containerd 1.6 has no Transfer service), its blobs written into
//! containerd's content store under a lease, the image recorded and its layers unpacked
//! into overlayfs snapshots labelled for containerd's garbage collector; the result is
//! remembered in `DATA_DIR/cache/images` so that a prepared image runs again without the
//! registry.

use super::{grpc, Containerd, ContainerdError, ImageConfig, PreparedImage, SNAPSHOTTER};
use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, Image, InfoRequest, UpdateImageRequest, UpdateRequest,
    WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Code;
use containerd_client::types::Descriptor;
use shoal_api::model::oci::OciRef;
use shoal_registry::PulledImage;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

impl Containerd {
    /// Pulls and unpacks the pinned `image` for this device's architecture, unless it was
    /// prepared before and its snapshot still exists.
    pub async fn prepare(&self, image: &OciRef) -> Result<Arc<PreparedImage>, ContainerdError> {
        let Some(digest) = &image.digest else {
            return Err(ContainerdError::Image {
                image: image.to_string(),
                reason: "not pinned".into(),
            });
        };
        let record = self.cache.join(format!("{}.json", digest.hex()));
        if let Ok(bytes) = tokio::fs::read(&record).await {
            if let Ok(p) = serde_json::from_slice::<PreparedImage>(&bytes) {
                if self.snapshot_exists(&p.chain).await {
                    return Ok(Arc::new(p));
                }
            }
        }
        let blobs = self.cache.join("blobs");
        let pulled = self
            .registries
            .pull_image(
                image,
                std::env::consts::ARCH,
                shoal_api::model::oci::native_variant(),
                &blobs,
            )
            .await?;
        let prepared = self.import(&pulled).await?;
        let bytes = serde_json::to_vec(&prepared).unwrap_or_default();
        let tmp = record.with_extension("tmp");
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| ContainerdError::Io { path, source }
        };
        tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
        tokio::fs::rename(&tmp, &record)
            .await
            .map_err(io(&record))?;
        // The blobs now live in containerd's content store.
        for l in &pulled.layers {
            let _ = tokio::fs::remove_file(&l.path).await;
        }
        let _ = tokio::fs::remove_file(blobs.join(pulled.config.2.hex())).await;
        info!(image = %image, chain = %prepared.chain, "image pulled and unpacked");
        Ok(Arc::new(prepared))
    }

    async fn snapshot_exists(&self, key: &str) -> bool {
        SnapshotsClient::new(self.channel.clone())
            .stat(self.req(
                StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.into(),
                },
                None,
            ))
            .await
            .is_ok()
    }

    /// Writes a pulled image into containerd and unpacks it, under a lease so that nothing
    /// is collected half-way.
    async fn import(&self, p: &PulledImage) -> Result<PreparedImage, ContainerdError> {
        let lease = format!("shoal-pull-{}", rand::random::<u64>());
        let expire = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(3600),
        )
        .to_string();
        self.client()
            .leases()
            .create(self.req(
                containerd_client::services::v1::CreateRequest {
                    id: lease.clone(),
                    labels: HashMap::from([("containerd.io/gc.expire".into(), expire)]),
                },
                None,
            ))
            .await
            .map_err(grpc("lease create"))?;
        let result = self.import_leased(p, &lease).await;
        let _ = self
            .client()
            .leases()
            .delete(self.req(
                containerd_client::services::v1::DeleteRequest {
                    id: lease,
                    sync: false,
                },
                None,
            ))
            .await;
        result
    }

    async fn import_leased(
        &self,
        p: &PulledImage,
        lease: &str,
    ) -> Result<PreparedImage, ContainerdError> {
        let image = p.reference.to_string();
        let bad = |reason: String| ContainerdError::Image {
            image: image.clone(),
            reason,
        };
        let config = ImageConfig::from_blob(&p.config.1).map_err(|e| bad(e.to_string()))?;
        let config_json: serde_json::Value =
            serde_json::from_slice(&p.config.1).map_err(|e| bad(e.to_string()))?;
        let diff_ids: Vec<String> = config_json["rootfs"]["diff_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect();
        if diff_ids.len() != p.layers.len() {
            return Err(bad(format!(
                "{} layers but {} diff ids in the config",
                p.layers.len(),
                diff_ids.len()
            )));
        }
        // Children first: layers, config, manifest, index; each parent labels its children
        // so that containerd's garbage collector keeps them.
        let mut manifest_labels = HashMap::new();
        for (i, l) in p.layers.iter().enumerate() {
            let bytes = tokio::fs::read(&l.path)
                .await
                .map_err(|source| ContainerdError::Io {
                    path: l.path.display().to_string(),
                    source,
                })?;
            self.write_blob(lease, l.digest.as_str(), &bytes, HashMap::new())
                .await?;
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.to_string(),
            );
        }
        self.write_blob(lease, p.config.2.as_str(), &p.config.1, HashMap::new())
            .await?;
        manifest_labels.insert(
            "containerd.io/gc.ref.content.config".into(),
            p.config.2.to_string(),
        );
        self.write_blob(lease, p.manifest.2.as_str(), &p.manifest.1, manifest_labels)
            .await?;
        let target = match &p.index {
            Some((media, bytes)) => {
                let digest = shoal_api::model::ids::Digest::of(bytes);
                let labels = HashMap::from([(
                    "containerd.io/gc.ref.content.m.0".to_string(),
                    p.manifest.2.to_string(),
                )]);
                self.write_blob(lease, digest.as_str(), bytes, labels)
                    .await?;
                Descriptor {
                    media_type: media.clone(),
                    digest: digest.to_string(),
                    size: bytes.len() as i64,
                    annotations: HashMap::new(),
                }
            }
            None => Descriptor {
                media_type: p.manifest.0.clone(),
                digest: p.manifest.2.to_string(),
                size: p.manifest.1.len() as i64,
                annotations: HashMap::new(),
            },
        };
        let name = p.reference.without_scheme();
        let record = Image {
            name: name.clone(),
            target: Some(target),
            ..Default::default()
        };
        let mut images = self.client().images();
        match images
            .create(self.req(
                CreateImageRequest {
                    image: Some(record.clone()),
                    ..Default::default()
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(self.req(
                        UpdateImageRequest {
                            image: Some(record),
                            ..Default::default()
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(grpc("image update"))?;
            }
            Err(s) => return Err(grpc("image create")(s)),
        }

        // Unpack: one committed snapshot per layer, named by its chain id.
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let mut content = self.client().content();
        let mut parent = String::new();
        for (i, l) in p.layers.iter().enumerate() {
            let chain = if i == 0 {
                diff_ids[0].clone()
            } else {
                shoal_api::model::ids::Digest::of(format!("{parent} {}", diff_ids[i]).as_bytes())
                    .to_string()
            };
            if self.snapshot_exists(&chain).await {
                parent = chain;
                continue;
            }
            let key = format!("extract-{} {chain}", rand::random::<u32>());
            let mounts = snapshots
                .prepare(self.req(
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels: HashMap::from([(
                            "containerd.io/snapshot.ref".into(),
                            chain.clone(),
                        )]),
                    },
                    Some(lease),
                ))
                .await
                .map_err(grpc("snapshot prepare"))?
                .into_inner()
                .mounts;
            let applied = self
                .client()
                .diff()
                .apply(self.req(
                    ApplyRequest {
                        diff: Some(Descriptor {
                            media_type: l.media_type.clone(),
                            digest: l.digest.to_string(),
                            size: l.size as i64,
                            annotations: HashMap::new(),
                        }),
                        mounts,
                        ..Default::default()
                    },
                    Some(lease),
                ))
                .await
                .map_err(grpc("layer apply"))?
                .into_inner()
                .applied;
            let applied = applied.map(|a| a.digest).unwrap_or_default();
            if applied != diff_ids[i] {
                let _ = snapshots
                    .remove(self.req(
                        RemoveSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key,
                        },
                        Some(lease),
                    ))
                    .await;
                return Err(bad(format!(
                    "layer {} unpacked to {applied}, but the config says {}",
                    l.digest, diff_ids[i]
                )));
            }
            snapshots
                .commit(self.req(
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        name: chain.clone(),
                        key,
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await
                .map_err(grpc("snapshot commit"))?;
            self.label(
                &mut content,
                lease,
                l.digest.as_str(),
                "containerd.io/uncompressed",
                &diff_ids[i],
            )
            .await?;
            parent = chain;
        }
        // This label keeps the unpacked chain alive as long as the image is.
        self.label(
            &mut content,
            lease,
            p.config.2.as_str(),
            &format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
            &parent,
        )
        .await?;
        Ok(PreparedImage {
            name,
            chain: parent,
            config,
        })
    }

    async fn label(
        &self,
        content: &mut containerd_client::services::v1::content_client::ContentClient<Channel>,
        lease: &str,
        digest: &str,
        key: &str,
        value: &str,
    ) -> Result<(), ContainerdError> {
        content
            .update(self.req(
                UpdateRequest {
                    info: Some(containerd_client::services::v1::Info {
                        digest: digest.into(),
                        labels: HashMap::from([(key.to_string(), value.to_string())]),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec![format!("labels.{key}")],
                    }),
                },
                Some(lease),
            ))
            .await
            .map_err(grpc("content label"))?;
        Ok(())
    }

    /// Writes `bytes` as blob `digest` into the content store, unless it is there.
    async fn write_blob(
        &self,
        lease: &str,
        digest: &str,
        bytes: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let mut content = self.client().content();
        match content
            .info(self.req(
                InfoRequest {
                    digest: digest.into(),
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(grpc("content info")(s)),
        }
        let total = bytes.len() as i64;
        let r#ref = format!("shoal-{digest}");
        let mut msgs: Vec<WriteContentRequest> = bytes
            .chunks(1 << 20)
            .scan(0i64, |offset, chunk| {
                let m = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: r#ref.clone(),
                    total,
                    expected: digest.into(),
                    offset: *offset,
                    data: chunk.to_vec(),
                    labels: HashMap::new(),
                };
                *offset += chunk.len() as i64;
                Some(m)
            })
            .collect();
        msgs.push(WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref,
            total,
            expected: digest.into(),
            offset: total,
            data: Vec::new(),
            labels,
        });
        let written = content
            .write(self.req(tokio_stream::iter(msgs), Some(lease)))
            .await;
        match written {
            Ok(resp) => {
                let mut resp = resp.into_inner();
                while resp
                    .message()
                    .await
                    .map_err(grpc(format!("content write of {digest}")))?
                    .is_some()
                {}
                Ok(())
            }
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(grpc(format!("content write of {digest}"))(s)),
        }
    }
}
