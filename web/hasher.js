// A worker that hashes shards, so that verifying them takes no time from the engine's thread while
// it uploads. shards.js posts {id, blob} for each piece of a shard in order as it arrives, then
// {id, end: true}, and gets {id, sha256} (hex) or {id, error}.

import { BufferPool, HASH_PIECE, Sha256Job } from "./shards.js";

const jobs = new Map();
const pool = new BufferPool(HASH_PIECE);     // the buffers every job reads its pieces into

self.onmessage = ({ data: { id, blob, end } }) => {
  let job = jobs.get(id);
  if (!job) jobs.set(id, job = new Sha256Job(pool));
  if (blob) job.add(blob);
  if (end) {
    jobs.delete(id);
    job.digest().then((sha256) => self.postMessage({ id, sha256 }),
                      (e) => self.postMessage({ id, error: String((e && e.message) || e) }));
  }
};
