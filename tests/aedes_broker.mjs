// An aedes MQTT broker for tests/test_interop.py (issue 14): one process, one loopback port.
// Usage: node aedes_broker.mjs NODE_MODULES_DIR PORT
// Sessions, subscriptions and queued QoS 1 messages live in aedes' default persistence
// (aedes-persistence, in memory): a persistent session survives its client's disconnects and
// kills for as long as this process runs, which is what the interop scenario needs.
import net from 'node:net'
import path from 'node:path'
import { readFileSync } from 'node:fs'
import { pathToFileURL } from 'node:url'

const [modules, port] = process.argv.slice(2)
const aedesDir = path.join(modules, 'aedes')
const { Aedes } = await import(pathToFileURL(path.join(aedesDir, 'aedes.js')).href)
const { version } = JSON.parse(readFileSync(path.join(aedesDir, 'package.json'), 'utf8'))

const broker = await Aedes.createBroker()
broker.on('clientError', (client, err) => console.error('client error', client && client.id, err.message))
broker.on('connectionError', (client, err) => console.error('connection error', err.message))

const server = net.createServer(broker.handle)
server.listen(Number(port), '127.0.0.1', () => {
  console.log(`aedes ${version} listening on 127.0.0.1:${port}`)
})

function shutdown () {
  server.close()
  broker.close(() => process.exit(0))
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
