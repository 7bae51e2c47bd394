"""Word lists and facts behind the built-in task probes in ``importance.data.tasks``.

Everything here was written by hand for imprune. Facts are chosen to have one clear answer (no disputed
capitals, no countries with several main languages, no accented names); word pairs are listed in the
direction they are asked, so each prompt has one intended answer.
"""

from __future__ import annotations

# --- knowledge ------------------------------------------------------------------------------------------

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Iceland", "Reykjavik"), ("Russia", "Moscow"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"), ("Albania", "Tirana"), ("Armenia", "Yerevan"),
    ("Azerbaijan", "Baku"), ("Uzbekistan", "Tashkent"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("South Korea", "Seoul"), ("North Korea", "Pyongyang"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"), ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"), ("Afghanistan", "Kabul"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Syria", "Damascus"), ("Jordan", "Amman"), ("Lebanon", "Beirut"),
    ("Turkey", "Ankara"), ("Qatar", "Doha"), ("Cambodia", "Phnom Penh"), ("Malaysia", "Kuala Lumpur"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"),
    ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"),
    ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"), ("Angola", "Luanda"),
    ("Libya", "Tripoli"), ("Sudan", "Khartoum"), ("Canada", "Ottawa"), ("the United States", "Washington"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Jamaica", "Kingston"), ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"), ("Peru", "Lima"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
)

# (name, symbol, atomic number)
ELEMENTS: tuple[tuple[str, str, int], ...] = (
    ("hydrogen", "H", 1), ("helium", "He", 2), ("lithium", "Li", 3), ("beryllium", "Be", 4),
    ("boron", "B", 5), ("carbon", "C", 6), ("nitrogen", "N", 7), ("oxygen", "O", 8), ("fluorine", "F", 9),
    ("neon", "Ne", 10), ("sodium", "Na", 11), ("magnesium", "Mg", 12), ("aluminum", "Al", 13),
    ("silicon", "Si", 14), ("phosphorus", "P", 15), ("sulfur", "S", 16), ("chlorine", "Cl", 17),
    ("argon", "Ar", 18), ("potassium", "K", 19), ("calcium", "Ca", 20), ("titanium", "Ti", 22),
    ("chromium", "Cr", 24), ("manganese", "Mn", 25), ("iron", "Fe", 26), ("cobalt", "Co", 27),
    ("nickel", "Ni", 28), ("copper", "Cu", 29), ("zinc", "Zn", 30), ("bromine", "Br", 35),
    ("krypton", "Kr", 36), ("silver", "Ag", 47), ("tin", "Sn", 50), ("iodine", "I", 53), ("xenon", "Xe", 54),
    ("barium", "Ba", 56), ("tungsten", "W", 74), ("platinum", "Pt", 78), ("gold", "Au", 79),
    ("mercury", "Hg", 80), ("lead", "Pb", 82), ("radon", "Rn", 86), ("uranium", "U", 92),
)

PLANETS: tuple[str, ...] = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                             "ninth", "tenth", "eleventh", "twelfth")

LANGUAGES: tuple[tuple[str, str], ...] = (
    ("France", "French"), ("Germany", "German"), ("Austria", "German"), ("Italy", "Italian"),
    ("Spain", "Spanish"), ("Mexico", "Spanish"), ("Argentina", "Spanish"), ("Chile", "Spanish"),
    ("Colombia", "Spanish"), ("Cuba", "Spanish"), ("Portugal", "Portuguese"), ("Brazil", "Portuguese"),
    ("Japan", "Japanese"), ("South Korea", "Korean"), ("Russia", "Russian"), ("Greece", "Greek"),
    ("Turkey", "Turkish"), ("Poland", "Polish"), ("the Netherlands", "Dutch"), ("Sweden", "Swedish"),
    ("Norway", "Norwegian"), ("Denmark", "Danish"), ("Finland", "Finnish"), ("Iceland", "Icelandic"),
    ("Hungary", "Hungarian"), ("the Czech Republic", "Czech"), ("Romania", "Romanian"),
    ("Bulgaria", "Bulgarian"), ("Ukraine", "Ukrainian"), ("Iran", "Persian"), ("Egypt", "Arabic"),
    ("Saudi Arabia", "Arabic"), ("Israel", "Hebrew"), ("Vietnam", "Vietnamese"), ("Thailand", "Thai"),
    ("the United States", "English"), ("the United Kingdom", "English"), ("Australia", "English"),
)

BOOKS: tuple[tuple[str, str], ...] = (
    ("Pride and Prejudice", "Jane Austen"), ("Emma", "Jane Austen"), ("Sense and Sensibility", "Jane Austen"),
    ("Hamlet", "William Shakespeare"), ("Macbeth", "William Shakespeare"),
    ("Romeo and Juliet", "William Shakespeare"), ("Nineteen Eighty-Four", "George Orwell"),
    ("Animal Farm", "George Orwell"), ("War and Peace", "Leo Tolstoy"), ("Anna Karenina", "Leo Tolstoy"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("Don Quixote", "Miguel de Cervantes"),
    ("Moby-Dick", "Herman Melville"), ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("Great Expectations", "Charles Dickens"), ("Oliver Twist", "Charles Dickens"),
    ("A Tale of Two Cities", "Charles Dickens"), ("Frankenstein", "Mary Shelley"), ("Dracula", "Bram Stoker"),
    ("The Odyssey", "Homer"), ("The Iliad", "Homer"), ("Ulysses", "James Joyce"),
    ("To Kill a Mockingbird", "Harper Lee"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Brave New World", "Aldous Huxley"), ("The Hobbit", "J. R. R. Tolkien"),
    ("The Lord of the Rings", "J. R. R. Tolkien"), ("Adventures of Huckleberry Finn", "Mark Twain"),
    ("The Adventures of Tom Sawyer", "Mark Twain"), ("The Divine Comedy", "Dante Alighieri"),
    ("The Catcher in the Rye", "J. D. Salinger"), ("Lolita", "Vladimir Nabokov"),
    ("On the Origin of Species", "Charles Darwin"), ("The Raven", "Edgar Allan Poe"),
    ("Alice's Adventures in Wonderland", "Lewis Carroll"), ("Treasure Island", "Robert Louis Stevenson"),
    ("The Time Machine", "H. G. Wells"), ("The War of the Worlds", "H. G. Wells"),
    ("Fahrenheit 451", "Ray Bradbury"), ("Of Mice and Men", "John Steinbeck"),
    ("The Grapes of Wrath", "John Steinbeck"), ("Robinson Crusoe", "Daniel Defoe"),
    ("Gulliver's Travels", "Jonathan Swift"), ("The Metamorphosis", "Franz Kafka"),
    ("The Picture of Dorian Gray", "Oscar Wilde"),
)

ANIMAL_CLASSES: tuple[tuple[str, str], ...] = (
    ("dog", "mammals"), ("cat", "mammals"), ("whale", "mammals"), ("dolphin", "mammals"), ("bat", "mammals"),
    ("elephant", "mammals"), ("horse", "mammals"), ("kangaroo", "mammals"), ("platypus", "mammals"),
    ("seal", "mammals"), ("giraffe", "mammals"), ("eagle", "birds"), ("penguin", "birds"),
    ("ostrich", "birds"), ("sparrow", "birds"), ("owl", "birds"), ("parrot", "birds"), ("chicken", "birds"),
    ("duck", "birds"), ("swan", "birds"), ("pigeon", "birds"), ("snake", "reptiles"), ("lizard", "reptiles"),
    ("crocodile", "reptiles"), ("turtle", "reptiles"), ("tortoise", "reptiles"), ("iguana", "reptiles"),
    ("chameleon", "reptiles"), ("alligator", "reptiles"), ("frog", "amphibians"), ("toad", "amphibians"),
    ("salamander", "amphibians"), ("newt", "amphibians"), ("shark", "fish"), ("salmon", "fish"),
    ("trout", "fish"), ("tuna", "fish"), ("goldfish", "fish"), ("cod", "fish"), ("ant", "insects"),
    ("bee", "insects"), ("butterfly", "insects"), ("beetle", "insects"), ("mosquito", "insects"),
    ("grasshopper", "insects"), ("ladybug", "insects"), ("spider", "arachnids"), ("scorpion", "arachnids"),
)

CONTINENTS: tuple[tuple[str, str], ...] = (
    ("Kenya", "Africa"), ("Nigeria", "Africa"), ("Ghana", "Africa"), ("Morocco", "Africa"),
    ("Ethiopia", "Africa"), ("Senegal", "Africa"), ("Zambia", "Africa"), ("Mali", "Africa"),
    ("Uganda", "Africa"), ("Angola", "Africa"), ("Brazil", "South America"), ("Argentina", "South America"),
    ("Peru", "South America"), ("Chile", "South America"), ("Colombia", "South America"),
    ("Ecuador", "South America"), ("Uruguay", "South America"), ("Bolivia", "South America"),
    ("Paraguay", "South America"), ("Venezuela", "South America"), ("Japan", "Asia"), ("India", "Asia"),
    ("Thailand", "Asia"), ("Vietnam", "Asia"), ("Nepal", "Asia"), ("Mongolia", "Asia"), ("Pakistan", "Asia"),
    ("Bangladesh", "Asia"), ("Laos", "Asia"), ("Cambodia", "Asia"), ("France", "Europe"),
    ("Germany", "Europe"), ("Poland", "Europe"), ("Sweden", "Europe"), ("Norway", "Europe"),
    ("Italy", "Europe"), ("Spain", "Europe"), ("Portugal", "Europe"), ("Ireland", "Europe"),
    ("Hungary", "Europe"), ("Austria", "Europe"), ("Finland", "Europe"), ("Canada", "North America"),
    ("Mexico", "North America"), ("the United States", "North America"),
)

MONTHS: tuple[str, ...] = ("January", "February", "March", "April", "May", "June", "July", "August",
                           "September", "October", "November", "December")
WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# Single facts, asked exactly as written.
MISC_FACTS: tuple[tuple[str, str], ...] = (
    ("The largest planet in the Solar System is", "Jupiter"),
    ("The star at the center of the Solar System is called the", "Sun"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The chemical formula for water is", "H2O"),
    ("The number of days in a week is", "seven"),
    ("The number of hours in a day is", "24"),
    ("The number of months in a year is", "twelve"),
    ("At sea level, water boils at a temperature in degrees Celsius of", "100"),
    ("In degrees Celsius, pure water freezes at", "0"),
    ("The number of legs on a spider is", "eight"),
    ("The number of legs on an insect is", "six"),
    ("The number of sides of a triangle is", "three"),
    ("The number of sides of a hexagon is", "six"),
    ("The tallest mountain on Earth is Mount", "Everest"),
    ("The largest ocean on Earth is the", "Pacific"),
    ("The first president of the United States was George", "Washington"),
    ("The Moon orbits the planet", "Earth"),
    ("The gas that plants take in from the air to make food is carbon", "dioxide"),
    ("The organ that pumps blood through the human body is the", "heart"),
    ("The closest planet to the Sun is", "Mercury"),
)

# Three wrong answers of the same kind per fact (the probes' multiple-choice distractors), by prompt.
MISC_DISTRACTORS: dict[str, tuple[str, ...]] = {
    "The largest planet in the Solar System is": ("Saturn", "Mars", "Venus"),
    "The star at the center of the Solar System is called the": ("Moon", "Earth", "Comet"),
    "Water is made of hydrogen and": ("nitrogen", "carbon", "helium"),
    "The chemical formula for water is": ("CO2", "NaCl", "O2"),
    "The number of days in a week is": ("five", "six", "eight"),
    "The number of hours in a day is": ("12", "20", "36"),
    "The number of months in a year is": ("ten", "eleven", "fourteen"),
    "At sea level, water boils at a temperature in degrees Celsius of": ("50", "80", "200"),
    "In degrees Celsius, pure water freezes at": ("10", "32", "100"),
    "The number of legs on a spider is": ("six", "four", "ten"),
    "The number of legs on an insect is": ("four", "eight", "ten"),
    "The number of sides of a triangle is": ("four", "five", "six"),
    "The number of sides of a hexagon is": ("five", "seven", "eight"),
    "The tallest mountain on Earth is Mount": ("Kilimanjaro", "Fuji", "Olympus"),
    "The largest ocean on Earth is the": ("Atlantic", "Indian", "Arctic"),
    "The first president of the United States was George": ("Lincoln", "Jefferson", "Adams"),
    "The Moon orbits the planet": ("Mars", "Venus", "Jupiter"),
    "The gas that plants take in from the air to make food is carbon": ("monoxide", "oxide", "fiber"),
    "The organ that pumps blood through the human body is the": ("liver", "lung", "brain"),
    "The closest planet to the Sun is": ("Venus", "Mars", "Earth"),
}

# --- semantic -------------------------------------------------------------------------------------------

# (word, synonym asked for)
SYNONYMS: tuple[tuple[str, str], ...] = (
    ("big", "large"), ("start", "begin"), ("finish", "end"), ("quick", "fast"), ("glad", "happy"),
    ("mad", "angry"), ("clever", "smart"), ("simple", "easy"), ("difficult", "hard"), ("shut", "close"),
    ("purchase", "buy"), ("assist", "help"), ("wealthy", "rich"), ("ill", "sick"), ("present", "gift"),
    ("sofa", "couch"), ("rock", "stone"), ("street", "road"), ("automobile", "car"), ("child", "kid"),
    ("talk", "speak"), ("reply", "answer"), ("silent", "quiet"), ("afraid", "scared"), ("correct", "right"),
    ("incorrect", "wrong"), ("inquire", "ask"), ("little", "small"), ("huge", "enormous"), ("shout", "yell"),
    ("weep", "cry"), ("grin", "smile"), ("jump", "leap"), ("fix", "repair"), ("choose", "pick"),
    ("gather", "collect"), ("rip", "tear"), ("damp", "moist"), ("chilly", "cold"), ("brave", "courageous"),
    ("funny", "humorous"), ("odd", "strange"), ("pretty", "beautiful"), ("baby", "infant"),
    ("fall", "autumn"), ("beneath", "below"), ("often", "frequently"), ("maybe", "perhaps"),
    ("enough", "sufficient"), ("entire", "whole"), ("ancient", "old"), ("shiny", "bright"), ("rapid", "fast"),
    ("error", "mistake"), ("task", "job"), ("center", "middle"), ("trash", "garbage"), ("pants", "trousers"),
    ("hurry", "rush"), ("journey", "trip"), ("chance", "opportunity"), ("woods", "forest"), ("story", "tale"),
    ("shop", "store"), ("alter", "change"), ("vanish", "disappear"), ("build", "construct"),
    ("permit", "allow"), ("conceal", "hide"), ("commence", "begin"), ("obtain", "get"), ("require", "need"),
    ("attempt", "try"), ("depart", "leave"), ("precise", "exact"), ("vital", "essential"), ("tidy", "neat"),
    ("filthy", "dirty"), ("slim", "thin"), ("cheerful", "happy"), ("furious", "angry"), ("sleepy", "tired"),
    ("gigantic", "huge"), ("frightened", "scared"), ("sum", "total"), ("foe", "enemy"), ("chef", "cook"),
    ("physician", "doctor"), ("attorney", "lawyer"), ("pupil", "student"), ("photo", "picture"),
    ("film", "movie"), ("stated", "said"), ("couple", "pair"), ("below", "under"),
)

# (word, antonym asked for)
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("tall", "short"), ("up", "down"), ("open", "closed"),
    ("happy", "sad"), ("fast", "slow"), ("early", "late"), ("young", "old"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("soft", "hard"), ("difficult", "easy"), ("clean", "dirty"),
    ("full", "empty"), ("true", "false"), ("love", "hate"), ("win", "lose"), ("buy", "sell"),
    ("push", "pull"), ("give", "take"), ("before", "after"), ("above", "below"), ("inside", "outside"),
    ("left", "right"), ("north", "south"), ("east", "west"), ("day", "night"), ("black", "white"),
    ("good", "bad"), ("heavy", "light"), ("thick", "thin"), ("wide", "narrow"), ("deep", "shallow"),
    ("loud", "quiet"), ("cheap", "expensive"), ("always", "never"), ("friend", "enemy"), ("war", "peace"),
    ("question", "answer"), ("first", "last"), ("remember", "forget"), ("accept", "reject"),
    ("increase", "decrease"), ("maximum", "minimum"), ("success", "failure"), ("victory", "defeat"),
    ("polite", "rude"), ("brave", "cowardly"), ("alive", "dead"), ("asleep", "awake"), ("smooth", "rough"),
    ("ancient", "modern"), ("guilty", "innocent"), ("male", "female"), ("positive", "negative"),
    ("major", "minor"), ("inner", "outer"), ("upper", "lower"), ("import", "export"), ("entrance", "exit"),
    ("visible", "invisible"), ("possible", "impossible"), ("legal", "illegal"), ("honest", "dishonest"),
    ("agree", "disagree"), ("appear", "disappear"), ("safe", "dangerous"), ("near", "far"),
    ("sunrise", "sunset"), ("laugh", "cry"), ("top", "bottom"), ("front", "back"), ("husband", "wife"),
    ("king", "queen"), ("boy", "girl"), ("brother", "sister"), ("uncle", "aunt"), ("mother", "father"),
    ("summer", "winter"), ("floor", "ceiling"), ("send", "receive"), ("plus", "minus"), ("odd", "even"),
    ("float", "sink"), ("include", "exclude"), ("optimist", "pessimist"), ("superior", "inferior"),
    ("singular", "plural"), ("ascend", "descend"), ("arrival", "departure"), ("dawn", "dusk"),
    ("cause", "effect"), ("input", "output"), ("profit", "loss"), ("wild", "tame"),
    ("temporary", "permanent"), ("public", "private"), ("urban", "rural"), ("vertical", "horizontal"),
    ("artificial", "natural"),
    ("minority", "majority"), ("absent", "present"), ("boring", "interesting"),
)

# Links the synonym and antonym lists miss, so that no semantic distractor is a second right answer (the probes
# draw distractors only from other clusters of linked words).
RELATED: tuple[tuple[str, str], ...] = (
    ("big", "huge"), ("large", "enormous"), ("small", "tiny"), ("little", "short"), ("short", "thin"),
    ("narrow", "thin"), ("light", "weak"), ("happy", "glad"), ("sad", "angry"), ("fast", "rapid"),
    ("quick", "rush"), ("end", "finish"), ("end", "last"), ("stop", "end"), ("old", "ancient"),
    ("right", "correct"), ("close", "shut"), ("close", "near"), ("hard", "difficult"), ("cold", "chilly"),
    ("scared", "cowardly"), ("begin", "start"), ("hurry", "fast"), ("trip", "journey"), ("quiet", "silent"),
    ("bright", "light"), ("clever", "bright"), ("sick", "ill"), ("answer", "reply"), ("leave", "exit"),
    ("pick", "choose"), ("get", "take"), ("under", "beneath"), ("dirty", "filthy"), ("dead", "late"),
)

# --- shared names and nouns -----------------------------------------------------------------------------

NAMES: tuple[str, ...] = (
    "Ann", "Bob", "Carl", "Dana", "Eve", "Fred", "Gina", "Hugo", "Ivan", "Jill", "Kate", "Liam", "Mia",
    "Nora", "Omar", "Paul", "Rosa", "Sam", "Tina", "Vera", "Will", "Zoe", "Adam", "Beth", "Chris", "Dan",
    "Emma", "Finn", "Grace", "Hank", "Iris", "Jack", "Leo", "Max", "Nina", "Owen", "Pete", "Ruth", "Sara",
    "Tom", "Uma", "Wes", "Lucy", "Mark", "Ella", "Ben",
)

# Keys for the retrieval lists (none of them a word of the retrieval templates).
KEY_NOUNS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "lamp", "tiger", "violin", "garden", "pencil", "rocket", "candle",
    "mirror", "anchor", "forest", "castle", "pepper", "window", "bridge", "hammer", "planet", "ladder",
    "basket", "jacket", "rabbit", "island", "meadow", "carpet", "helmet", "orange", "saddle", "lemon",
    "tunnel", "wallet", "falcon", "engine", "button", "kettle", "pillow", "marble", "desert",
)
COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black",
                           "white", "gray", "silver", "gold")

# --- logic ----------------------------------------------------------------------------------------------

# Made-up category nouns (plural = noun + "s", all start with a consonant) and real properties (none ends in
# "s", so a test can strip the plural "s" from category words only).
NONCE_NOUNS: tuple[str, ...] = (
    "blicket", "wug", "fep", "zorp", "glim", "tove", "florp", "grink", "mib", "plonk", "quib", "slith",
    "toma", "vurp", "yim", "zib", "norb", "krell", "dorf", "lunk", "pim", "savit", "bromp", "kiv",
)
PROPERTIES: tuple[str, ...] = (
    "red", "tall", "soft", "loud", "round", "striped", "heavy", "shiny", "cold", "fast", "quiet", "green",
    "small", "sticky", "smooth", "sweet", "warm", "blue", "friendly", "old",
)

# --- syntax ---------------------------------------------------------------------------------------------

# (singular, plural) subjects for agreement items: small things, animals and people.
NOUNS: tuple[tuple[str, str], ...] = (
    ("key", "keys"), ("book", "books"), ("dog", "dogs"), ("cat", "cats"), ("teacher", "teachers"),
    ("picture", "pictures"), ("student", "students"), ("flower", "flowers"), ("bottle", "bottles"),
    ("letter", "letters"), ("box", "boxes"), ("painting", "paintings"), ("lamp", "lamps"), ("bird", "birds"),
    ("child", "children"), ("woman", "women"), ("man", "men"), ("doctor", "doctors"), ("cup", "cups"),
    ("bag", "bags"), ("ball", "balls"), ("toy", "toys"), ("plant", "plants"), ("clock", "clocks"),
)
# Attractors: "The key near the windows ..." (every place fits every preposition and subject).
PLACE_PREPOSITIONS: tuple[str, ...] = ("near", "behind", "next to", "beside", "in front of", "by")
PLACES: tuple[tuple[str, str], ...] = (
    ("window", "windows"), ("door", "doors"), ("table", "tables"), ("chair", "chairs"), ("car", "cars"),
    ("tree", "trees"), ("house", "houses"), ("bench", "benches"), ("wall", "walls"), ("bed", "beds"),
    ("sofa", "sofas"), ("fence", "fences"), ("desk", "desks"), ("shelf", "shelves"),
)
# People nouns, the subjects of relative clauses ("The book that the teachers liked").
PEOPLE: tuple[tuple[str, str], ...] = (
    ("teacher", "teachers"), ("student", "students"), ("child", "children"), ("woman", "women"),
    ("man", "men"), ("farmer", "farmers"), ("doctor", "doctors"), ("singer", "singers"),
    ("neighbor", "neighbors"), ("boy", "boys"), ("girl", "girls"), ("pilot", "pilots"),
)
PREPOSITIONS: tuple[str, ...] = ("to", "near", "on", "behind", "of", "next to", "under", "beside", "above",
                                 "with")
PAST_VERBS: tuple[str, ...] = ("liked", "saw", "found", "painted", "chose", "wanted", "noticed", "admired",
                               "described", "remembered")

# Plural forms, regular and irregular, for "one X ... three Xs" items.
PLURALS: tuple[tuple[str, str], ...] = (
    ("cat", "cats"), ("apple", "apples"), ("book", "books"), ("house", "houses"), ("bird", "birds"),
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("man", "men"),
    ("woman", "women"), ("goose", "geese"), ("person", "people"), ("sheep", "sheep"), ("knife", "knives"),
    ("leaf", "leaves"), ("wolf", "wolves"), ("box", "boxes"), ("bus", "buses"), ("city", "cities"),
    ("baby", "babies"), ("potato", "potatoes"), ("dress", "dresses"), ("watch", "watches"),
    ("shelf", "shelves"), ("puppy", "puppies"), ("glass", "glasses"), ("brush", "brushes"),
)
NUMBER_WORDS: tuple[str, ...] = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Subjects with their reflexive pronoun and tag pronoun.
SUBJECTS: tuple[tuple[str, str, str], ...] = (
    ("The boy", "himself", "he"), ("The girl", "herself", "she"), ("Tom", "himself", "he"),
    ("Mary", "herself", "she"), ("My uncle", "himself", "he"), ("My sister", "herself", "she"),
    ("The old man", "himself", "he"), ("The young woman", "herself", "she"), ("The king", "himself", "he"),
    ("The queen", "herself", "she"), ("The children", "themselves", "they"),
    ("The students", "themselves", "they"), ("The twins", "themselves", "they"),
    ("My parents", "themselves", "they"), ("We", "ourselves", "we"), ("I", "myself", "I"),
)
SOLO_ACTIONS: tuple[str, ...] = ("fixed the bike", "built the shed", "cleaned the whole house",
                                 "painted the fence", "cooked dinner", "carried the boxes upstairs",
                                 "planted the garden", "solved the puzzle")

# --- inference ------------------------------------------------------------------------------------------

# (comparative, opposite comparative, superlative, opposite superlative)
COMPARATIVES: tuple[tuple[str, str, str, str], ...] = (
    ("taller", "shorter", "tallest", "shortest"), ("older", "younger", "oldest", "youngest"),
    ("faster", "slower", "fastest", "slowest"), ("heavier", "lighter", "heaviest", "lightest"),
    ("stronger", "weaker", "strongest", "weakest"), ("richer", "poorer", "richest", "poorest"),
)
SMALL_THINGS: tuple[str, ...] = ("coin", "key", "ring", "marble", "button", "stamp", "pebble", "bead", "note")
# Containers are "the <color> <kind>" (e.g. "the red box"), so any nesting order is physically plausible.
CONTAINER_KINDS: tuple[str, ...] = ("box", "bag", "chest", "crate", "basket", "case")
# (past, base) of events ordered in time
EVENTS: tuple[tuple[str, str], ...] = (("arrived", "arrive"), ("left", "leave"), ("finished", "finish"),
                                       ("woke up", "wake up"), ("called", "call"), ("voted", "vote"))
