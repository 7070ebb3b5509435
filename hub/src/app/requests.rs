//! Requests from the HTTP adapter ([`super::request::Request`]), answered on their reply
//! channels after any change they made is durable.

use super::request::{DeviceAction, Request};
use super::*;
use crate::app::command::{Bus, Outbound};
use crate::store::Store;
use shoal_daemon::clock::now_ms;
use tracing::{info_span, warn, Instrument};

impl<S: Store, B: Bus> MainLoop<S, B> {
    pub(super) async fn on_request(&mut self, r: Request) {
        match r {
            Request::Revoked { devices } => {
                for d in &devices {
                    self.publisher.keys.forget(d);
                }
                let r = self.fleet(|f| f.set_revoked(devices));
                if let Err(e) = self.published(r).await {
                    warn!(error = %e, "cannot move replicas off revoked devices");
                }
            }
            Request::Audit { change, reply } => {
                let _ = reply.send(self.record_audit(change));
            }
            Request::AuditLog { after, reply } => {
                let _ = reply.send(self.core.audit_since(after, crate::fleet::audit::IN_MEMORY));
            }
            Request::Apply { text, reply } => {
                let result = self
                    .apply(&text.0, None, false)
                    .instrument(info_span!("apply", source = "http"))
                    .await;
                let _ = reply.send(result);
            }
            Request::Delete { name, reply } => {
                let done = self.fleet(|f| f.delete(&name));
                let r = self.published(done).await;
                let _ = reply.send(r);
            }
            Request::Secrets { reply } => {
                let _ = reply.send(self.core.secret_views());
            }
            Request::DeleteSecret { name, reply } => {
                let r = match self.core.delete_secret(&name) {
                    Ok(()) => self.persisted().map_err(Failed::from),
                    Err(refused) => Err(Failed::Refused(refused)),
                };
                let _ = reply.send(r);
            }
            Request::Policy { reply } => {
                let _ = reply.send(self.core.policy());
            }
            Request::SetPolicy { policy, reply } => {
                let r = match self.core.set_policy(policy) {
                    Ok(()) => self.persisted().map_err(Failed::from),
                    Err(refused) => Err(Failed::Refused(refused)),
                };
                let _ = reply.send(r);
            }
            Request::DeleteDevice { id, reply } => {
                let done = self.fleet(|f| f.delete_device(&id));
                let r = self.command(done).await;
                if r.is_ok() {
                    let forget = Outbound::Forget { device: id.clone() };
                    if let Err(e) = self.publisher.bus.send(forget).await {
                        warn!(device = %id, error = %e, "cannot clear the deleted device's retained messages");
                    }
                }
                let _ = reply.send(r);
            }
            Request::Configs { reply } => {
                let _ = reply.send(self.core.config_views());
            }
            Request::Config { name, reply } => {
                let _ = reply.send(self.core.describe_config(&name));
            }
            Request::DeleteConfig { name, reply } => {
                let r = match self.core.delete_config(&name) {
                    Ok(()) => self.persisted().map_err(Failed::from),
                    Err(refused) => Err(Failed::Refused(refused)),
                };
                let _ = reply.send(r);
            }
            Request::Enrolled { device } => self.enrolled(device).await,
            Request::Label {
                id,
                meta,
                change,
                reply,
            } => {
                let done = match meta {
                    shoal_api::model::labels::Meta::Label => self.fleet(|f| f.label(&id, &change)),
                    shoal_api::model::labels::Meta::Annotation => self.core.annotate(&id, &change),
                };
                let r = match self.command(done).await {
                    Ok(()) => Ok(self.core.meta_of_device(&id, meta).unwrap_or_default()),
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Request::Logs {
                workload,
                device,
                tail,
                since_secs,
                follow,
                reply,
            } => {
                let ask = self.log_targets(&workload, device.as_ref());
                let opened = match ask {
                    Ok((devices, unreachable, replicas)) => {
                        let (events, out) = self.logs.open(
                            crate::logs::LogAsk {
                                workload,
                                devices: devices.clone(),
                                tail,
                                since_secs,
                                follow,
                            },
                            now_ms(),
                        );
                        self.publish_log_requests(out).await;
                        Ok(super::request::LogStream {
                            asked: devices,
                            unreachable,
                            replicas,
                            events,
                        })
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(opened);
            }
            Request::RefreshMetrics { reply } => {
                self.update_metrics();
                let _ = reply.send(());
            }
            Request::Fleet { after, reply } => {
                // One set of views serves both the event diff and the reply.
                let devices = self.core.device_views();
                let workloads = self.core.workload_views();
                self.observe(&devices, &workloads);
                let _ = reply.send(shoal_api::wire::views::FleetView {
                    devices,
                    workloads,
                    events: self.views.events.since(after, None),
                });
            }
            Request::Events {
                after,
                object,
                reply,
            } => {
                // Up to date with what the requester may just have done.
                self.record_events(true);
                let _ = reply.send(self.views.events.since(after, object.as_deref()));
            }
            Request::Devices { reply } => {
                let _ = reply.send(self.core.device_views());
            }
            Request::MayFetch {
                device,
                digest,
                reply,
            } => {
                let _ = reply.send(self.core.may_fetch(&device, &digest));
            }
            Request::Workloads { reply } => {
                let _ = reply.send(self.core.workload_views());
            }
            Request::Workload { name, reply } => {
                let _ = reply.send(self.core.workload_view(&name));
            }
            Request::Rollout {
                name,
                action,
                reply,
            } => {
                let done = self.fleet(|f| f.rollout_action(&name, action, now_ms()));
                let r = self.command(done).await;
                let _ = reply.send(r);
            }
            Request::Scale {
                name,
                replicas,
                reply,
            } => {
                let done = self.fleet(|f| f.scale(&name, replicas));
                let r = self.command(done).await;
                let _ = reply.send(r);
            }
            Request::Rerun { name, reply } => {
                let done = self.fleet(|f| f.rerun(&name, now_ms()));
                let r = self.command(done).await;
                let _ = reply.send(r);
            }
            Request::Device { id, action, reply } => {
                let r = self.fleet(|f| match action {
                    DeviceAction::Cordon => f.cordon(&id, true),
                    DeviceAction::Uncordon => f.cordon(&id, false),
                    DeviceAction::Drain => f.drain(&id),
                });
                let r = self.published(r).await;
                let _ = reply.send(r);
            }
        }
    }
}
