//! End-to-end tests: the real `sparkle` binary, spoken to like users and their tools do.
//! One test binary for all of them, so the suite links once.

mod affinity;
mod answers;
mod api_description;
mod api_keys;
mod at_rest;
mod browser;
mod chaos;
mod discord;
mod failover;
mod faults;
mod front_door;
mod image_links;
mod image_to_image;
mod limits;
mod loras;
mod models;
mod network;
mod postgres;
mod remote_worker;
mod s3;
mod scaling;
mod secrets_in_logs;
mod security;
mod service;
mod support;
mod transit;
