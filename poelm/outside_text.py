"""English text from outside the embedded corpus (which is Shakespeare, Milton and the King
James Bible): plain modern prose written for poelm and placed in the public domain, so that
decoding speed, speculative acceptance and WAND agreement can be measured on text the
models never saw in any form. Used by poelm.inference_bench and benchmarks/decode.py.

    from poelm.outside_text import PARAGRAPHS
"""

PARAGRAPHS = (
    "The morning train was late again, and the platform filled slowly with people who had stopped "
    "pretending to be surprised. A woman in a green coat read the timetable twice, as if the numbers "
    "might change if she looked at them long enough. Somewhere behind the ticket office a radio played "
    "an old song about the sea, and a porter whistled along without knowing the words.",
    "To make a simple loaf of bread you need only flour, water, salt and a little yeast. Mix them in a "
    "large bowl until the dough holds together, then knead it on the table for ten minutes, until it "
    "feels smooth and springs back when you press it. Leave it covered in a warm place for an hour, "
    "shape it gently, and bake it in a hot oven until the crust is brown and the bottom sounds hollow.",
    "The library on the corner had been built with money from a man who sold buttons. He wanted a "
    "place where children could read after school, and he insisted that the windows be tall enough to "
    "let in the afternoon light. A hundred years later the windows are still there, though the shelves "
    "now hold films and maps as well as books, and the children mostly come for the free internet.",
    "In the spring the garden behind the house turned into a small wild country. The roses climbed "
    "over the fence into the neighbour's yard, the mint spread under the path, and a family of sparrows "
    "argued every evening in the hedge. My father said he would tidy it all in the summer, but each "
    "summer he found a chair in the shade and decided that the birds were doing a fine job.",
    "The repair shop smelled of oil and hot metal. On the bench lay a bicycle with its wheels removed, "
    "a clock that had stopped at twenty past four, and a radio whose back had been opened like a book. "
    "The old mechanic worked on each of them in turn, slowly and without hurry, and when a customer "
    "asked how long it would take, he only answered that good work takes the time it takes.",
    "Every Saturday the market filled the square with tents of every colour. Farmers sold potatoes "
    "still covered in earth, a baker stacked loaves on a wooden cart, and a man with a grey beard sold "
    "honey from his own hives, offering each passer-by a taste on a small wooden spoon. By noon the "
    "crowd was so thick that the pigeons had given up and gone to sit on the roof of the town hall.",
    "The storm arrived in the middle of the night. First the wind pushed against the windows, then the "
    "rain came in long grey sheets, and finally the power went out with a soft click. We sat in the "
    "kitchen with a single candle and listened to the house creak around us. By morning the street was "
    "covered in leaves and broken branches, but the sky was clear and the air smelled clean and cold.",
    "Learning to swim as an adult is mostly a matter of trust. The water will hold you if you let it, "
    "but your body does not believe this at first, and every muscle tightens as if the pool were trying "
    "to pull you down. The teacher told us to breathe out slowly, to look at the bottom of the pool, and "
    "to stop fighting. After three weeks I could cross the shallow end without touching the floor.",
)
