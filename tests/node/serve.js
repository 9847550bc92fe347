// Start kinesalite bound to 127.0.0.1 only (its CLI listens on every interface).
// Usage: node serve.js PORT
const kinesalite = require('kinesalite')

const port = Number(process.argv[2])
const server = kinesalite({createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 100})
server.listen(port, '127.0.0.1', () => console.log('kinesalite on 127.0.0.1:%d', port))
